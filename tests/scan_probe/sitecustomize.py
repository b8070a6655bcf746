"""Counts data scans across processes (tests/test_distributed.py puts this folder on PYTHONPATH).

Python imports ``sitecustomize`` at start-up, so every process torchrun launches records each
``scan_split`` call (its RANK and split) in the file named by FASTKD_TEST_SCAN_LOG.
"""

import os

if os.environ.get("FASTKD_TEST_SCAN_LOG"):
    import fastkd.data

    _scan_split = fastkd.data.scan_split

    def _recorded_scan_split(root, split, **kwargs):
        with open(os.environ["FASTKD_TEST_SCAN_LOG"], "a") as log:
            log.write(f"{os.environ.get('RANK', '-')} {split}\n")
        return _scan_split(root, split, **kwargs)

    fastkd.data.scan_split = _recorded_scan_split
