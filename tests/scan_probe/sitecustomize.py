"""Counts data scans across processes (tests and benchmarks put this folder on PYTHONPATH).

Python imports ``sitecustomize`` at start-up, so every process torchrun launches records, in the
file named by FASTKD_TEST_SCAN_LOG, one line per walk of a split folder (``RANK walk SPLIT``)
and per bad-image pre-scan (``RANK prescan FILES``).
"""

import os

if os.environ.get("FASTKD_TEST_SCAN_LOG"):
    import fastkd.data.build as build
    import fastkd.data.folder as folder

    def _record(line: str) -> None:
        with open(os.environ["FASTKD_TEST_SCAN_LOG"], "a") as log:
            log.write(f"{os.environ.get('RANK', '-')} {line}\n")

    _scan_split, _find_bad_images = folder.scan_split, folder.find_bad_images

    def _recorded_scan_split(root, split, **kwargs):
        _record(f"walk {split}")
        return _scan_split(root, split, **kwargs)

    def _recorded_find_bad_images(files, **kwargs):
        _record(f"prescan {len(files)}")
        return _find_bad_images(files, **kwargs)

    # The name the scanning step calls, and the module's own (its functions call it too).
    build.scan_split = folder.scan_split = _recorded_scan_split
    folder.find_bad_images = _recorded_find_bad_images
