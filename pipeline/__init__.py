"""prep: a folder of class-sorted images in, a packaged and verified dataset out.

Architecture (data flows one way, top to bottom; no module imports one above it)::

    cli.py          parse options, build a stage config, call the stage, report
    stages/         one module per command: sample, index, resize, split, encode, pack, ...
    imaging.py      the pure per-image transform: bytes in, 8-bit pixels or a reason out
    executors.py    serial / local processes / Dask behind concurrent.futures.Executor
    sources.py      listing and reading the RAW tree
    workdir.py      the work directory's files, atomic writes, CSV/JSON, up-to-date stamps
    errors.py       the exceptions the CLI prints as one-line messages
"""

__version__ = "0.1.0"
