"""A ``datasets`` dataset of calibration text, as ``pbs2p compress --calib-dataset`` opens it.

``source`` is one of:

* a folder written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``: ``split`` picks one);
* a data file that ``datasets`` reads by its suffix: ``.json`` / ``.jsonl``, ``.csv``, ``.parquet``, ``.txt``
  (a ``.txt`` file gives one row per line in a ``text`` column);
* a dataset name for :func:`datasets.load_dataset` (read from the local ``datasets`` cache when offline).

Only the first ``rows`` rows are read (the calibration stream is their ``column`` texts joined), so a large
dataset costs what those rows cost.

Example::

    from pbs2p_lab.data.text_dataset import load_text_dataset
    rows = load_text_dataset("my_corpus.jsonl", column="body", rows=500)   # its texts in rows["text"]
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_FILE_BUILDERS", "describe_text_dataset", "load_text_dataset"]

#: suffix -> the ``datasets`` builder that reads it
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_text_dataset(source: str, *, split: str = "train", column: str = "text", rows: int = 2000):
    """The first ``rows`` rows of ``source``'s ``split`` as a ``datasets.Dataset`` whose one column, ``text``,
    holds the texts of ``column``.

    Raises ``ValueError`` naming the cause: a source ``datasets`` cannot open (or a file it does not read), a
    missing split or column, a column that does not hold text, an empty dataset.
    """
    import datasets

    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    path, suffix = Path(source), Path(source).suffix.lower()
    if path.is_file() and suffix not in DATA_FILE_BUILDERS:
        raise ValueError(f"{source}: datasets reads {', '.join(DATA_FILE_BUILDERS)} files, not {suffix or 'this'}")
    if not path.exists() and (suffix in DATA_FILE_BUILDERS or path.is_absolute() or source.startswith(".")):
        raise ValueError(f"{source} does not exist")
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        elif path.is_file():
            ds = datasets.load_dataset(DATA_FILE_BUILDERS[suffix], data_files={split: str(path)})
        else:
            ds = datasets.load_dataset(source)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise ValueError(f"datasets cannot open {source!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{source} has no split {split!r} (it has {', '.join(ds)})")
        ds = ds[split]
    if column not in ds.column_names:
        raise ValueError(f"{source} has no column {column!r} (it has {', '.join(ds.column_names)})")
    if not isinstance(ds.features[column], datasets.Value) or ds.features[column].dtype not in ("string",
                                                                                               "large_string"):
        raise ValueError(f"column {column!r} of {source} holds {ds.features[column]}, not text")
    if len(ds) == 0:
        raise ValueError(f"{source} ({split}) has no rows")
    ds = ds.select_columns([column]).select(range(min(rows, len(ds))))
    return ds if column == "text" else ds.rename_column(column, "text")


def describe_text_dataset(source: str, ds, *, split: str, column: str) -> dict:
    """JSON-ready description of a dataset from :func:`load_text_dataset` (its rows and fingerprint)."""
    return {"source": f"dataset {source}", "dataset_split": split, "dataset_column": column,
            "dataset_rows": len(ds), "dataset_fingerprint": ds._fingerprint}
