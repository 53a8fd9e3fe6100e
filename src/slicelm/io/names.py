"""Names the command line shows while it builds its parsers (``slicelm --help``), before anything heavy
loads: the default model, the dtype names, the data sets' and the output formats' names. :mod:`slicelm.io.models` maps
them to models and dtypes, :data:`slicelm.layouts.checkpoint.OUTPUT_FORMATS` registers the formats
(``tests/test_cli.py`` checks that the names here are the registry's)."""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
FORMAT_NAMES = ("auto", "stock", "decilm", "slicelm")  # auto: the most portable format that holds the plan
DATA_DIR_ENV = "SLICELM_DATA_DIR"  # the offline data folder, when --data-dir is not given
CALIBRATION_SETS: tuple[str, ...] = ("c4", "alpaca", "ptb", "wikitext2")
EVAL_SETS: tuple[str, ...] = ("wikitext2", "ptb", "c4")
