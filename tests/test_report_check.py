"""`make report-check`'s browser check: a page wider than a phone's screen fails, one that
reflows passes, and both get a screenshot of their whole height."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import report_check  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium)")

PAGE = """<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head>
<body><h1>A page</h1><div class="box"><table><tr>{cells}</tr></table></div>
<p style="height: 2400px">tall</p><p>end</p></body></html>"""
CELLS = "".join(f"<td>column-{i}-with-a-long-name</td>" for i in range(12))


def test_too_wide_page_fails_and_names_the_element(tmp_path: Path, capsys):
    page = tmp_path / "wide.html"
    page.write_text(PAGE.format(style="", cells=CELLS))
    assert report_check.main([str(page), "--widths", "390", "--out", str(tmp_path)]) == 1
    assert "table" in capsys.readouterr().err
    shot = Image.open(tmp_path / "screenshot-390.png")
    assert shot.height > 2400  # the whole page, not one screen


def test_page_whose_wide_table_scrolls_in_its_box_passes(tmp_path: Path):
    page = tmp_path / "narrow.html"
    page.write_text(PAGE.format(style=".box { overflow-x: auto; }", cells=CELLS))
    pages = report_check.check(page, [1280, 390], tmp_path)
    assert [p.too_wide for p in pages] == [False, False]
    assert [Image.open(p.screenshot).width for p in pages] == [1280, 390]
    assert all(p.height > 2400 for p in pages)
