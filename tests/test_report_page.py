"""The report page and the dataset card as templates render them: names that would be markup
escaped, images read only from resized/, the warnings and class weights shown, and a page
that a phone's browser shows without sideways scrolling."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from pipeline import workdir
from pipeline.stages import card, report
from tests.conftest import make_tree, write_image
from tests.test_report import Page, build_workdir, prep

SCRIPT = "<script>alert(1)</script>"
LONG = "a-class-name-without-any-space-that-goes-on-and-on-" * 3
TRICKY = ["<script>alert(1)", "a|b*c* _d_", LONG]  # folder names a file system takes


@pytest.fixture(scope="module")
def tricky(tmp_path_factory) -> Path:
    """A work directory, packaged and reported, whose classes are named like markup."""
    root = tmp_path_factory.mktemp("tricky")
    raw = make_tree(root / "raw", dict.fromkeys(TRICKY, 6), size=(12, 12))
    work = root / "work"
    prep(work, "run", raw, "--size", "8", "--format", "pkl.gz", "--executor", "serial")
    return work


def test_class_names_are_escaped_on_the_page(tricky: Path):
    text = (tricky / "report" / "index.html").read_text(encoding="utf-8")
    page = Page(text)
    assert "script" not in page.tags
    assert "&lt;script&gt;alert(1)" in text and "<script>alert" not in text
    names = [attrs["data-class"] for attrs, _ in page.tables["class-split"] if attrs.get("data-class")]
    assert sorted(names) == sorted(TRICKY)  # the parser unescapes: the names are shown as they are


def test_a_script_class_name_renders_escaped(tricky: Path):
    """A class named `<script>alert(1)</script>` (a folder cannot be: a name read from a file can)."""
    from pipeline.stages.facts import gather

    facts = gather(workdir.Workdir(tricky))
    renamed = {TRICKY[0]: SCRIPT}
    facts.manifest["classes"] = [renamed.get(c, c) for c in facts.manifest["classes"]]
    for split in facts.manifest["splits"].values():
        split["classes"] = {renamed.get(c, c): n for c, n in split["classes"].items()}
    for row in facts.splits:
        row["label"] = renamed.get(row["label"], row["label"])
    page = report.render(facts)
    assert "script" not in Page(page).tags and SCRIPT not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    text = card.render(facts)
    assert SCRIPT not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def cells(line: str) -> list[str]:
    """A Markdown table row's cells, split as GFM does: on every `|` not escaped by a backslash."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def unescape(markdown: str) -> str:
    """What a Markdown renderer shows for an escaped cell."""
    text = re.sub(r"\\([\\`*_\[\]|~$])", r"\1", markdown)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def test_class_names_do_not_break_the_card_tables(tricky: Path):
    text = (tricky / "README.md").read_text(encoding="utf-8").split("\n---\n", 1)[1]  # the Markdown body
    assert "<script" not in text
    classes = text.split("## Classes\n", 1)[1].split("\n## ", 1)[0]
    rows = [cells(line) for line in classes.splitlines() if line.startswith("|")]
    assert {len(r) for r in rows} == {6}  # header, rule, a row per class and the total: never a cell more
    manifest = json.loads((tricky / "manifest.json").read_text())
    assert [unescape(r[1]) for r in rows[2:-1]] == manifest["classes"]
    assert "a\\|b\\*c\\* \\_d\\_" in classes  # no cell split, no emphasis


@pytest.mark.parametrize("name, shown", [
    ("snake_case", "snake_case"),  # inside a word: no emphasis, nothing to escape
    ("_x_ *y* `z` [a](b) $m$ ~s~", r"\_x\_ \*y\* \`z\` \[a\](b) \$m\$ \~s\~"),
    ("R&D <b>", "R&amp;D &lt;b&gt;"),
    ("two\nlines", "two lines"),
])
def test_markdown_escaping(name: str, shown: str):
    assert card.md(name) == shown
    assert unescape(card.md(name)) == " ".join(name.split("\n"))


def test_code_spans_and_fences_hold_any_name():
    assert card.code("a`b") == "``a`b``"
    assert card.code("`x") == "`` `x ``"
    assert card.code("a|b", table=True) == "`a\\|b`"
    assert card.fence("```\nx", "sh") == "````sh\n```\nx\n````"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("page"), formats=("pkl.gz",))


def test_a_crafted_splits_row_does_not_inline_a_file_outside_resized(work: Path, tmp_path: Path):
    copy = tmp_path / "a" / "work"
    shutil.copytree(work, copy)
    secret = write_image(tmp_path / "secret.png", size=(13, 7), color=(1, 2, 3))  # WORK/../../secret.png
    path = copy / "splits.csv"
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows[0]["resized"] = "../../secret.png"
    workdir.write_csv(path, list(rows[0]), rows)
    prep(copy, "report")
    text = (copy / "report" / "index.html").read_text(encoding="utf-8")
    assert base64.b64encode(secret.read_bytes()).decode() not in text
    assert "not shown" in text
    assert len(Page(text).images) == len(Page((work / "report" / "index.html").read_text()).images) - 1


def test_warnings_come_first_and_class_weights_in_the_splits(work: Path, tmp_path: Path):
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    index = json.loads((copy / "index.json").read_text())
    index["warnings"] = []
    (copy / "index.json").write_text(json.dumps(index))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("class_weights", None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    found = {name: (copy / name).read_text() for name in ("rejected.csv", "conflicts.csv") if (copy / name).exists()}
    for name, text in found.items():  # header only: nothing rejected, no two-label pair
        (copy / name).write_text(text.splitlines()[0] + "\n")
    prep(copy, "report")
    plain = (copy / "report" / "index.html").read_text(encoding="utf-8")
    assert "check-first" not in plain and "class-weights" not in plain
    for name, text in found.items():
        (copy / name).write_text(text)

    index["warnings"] = [
        {"kind": "small_class", "message": "class dog has only 10 images", "class": "dog"},
        {"kind": "upscaled", "message": "12 images are smaller than 8 x 8 <and enlarged>"},
    ]
    (copy / "index.json").write_text(json.dumps(index))
    manifest["class_weights"] = {c: round(0.5 + i / 4, 3) for i, c in enumerate(manifest["classes"])}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    prep(copy, "report")
    text = (copy / "report" / "index.html").read_text(encoding="utf-8")
    first = text.index('id="check-first"')
    assert first < text.index('<section id="summary">')
    box = text[first:text.index("</aside>")]
    assert "Check these first" in box and "class dog has only 10 images" in box
    assert "&lt;and enlarged&gt;" in box and 'href="#splits"' in box and 'href="#sizes"' in box
    weights = {cells[0]: float(cells[1]) for cells in Page(text).rows("class-weights")[1:]}
    assert weights == manifest["class_weights"]


# -- in a browser --------------------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).parent))
import report_check  # noqa: E402

# the thumbnails in the first row of each class's samples (the fewest), and the right edge of the plots
FIRST_ROWS = """(() => JSON.stringify({
  thumbs: Math.min(...[...document.querySelectorAll('.thumbs')].map(t => {
    const figures = [...t.querySelectorAll('figure')], top = figures[0].getBoundingClientRect().top;
    return figures.filter(f => Math.abs(f.getBoundingClientRect().top - top) < 1).length; })),
  plots: Math.max(...[...document.querySelectorAll('img.plot')].map(i => i.getBoundingClientRect().right)),
}))()"""


def measure(browser: report_check.Browser, url: str, width: int) -> dict:
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    try:
        browser.call("Emulation.setDeviceMetricsOverride", session, width=width, height=900, deviceScaleFactor=1,
                     mobile=width < 600)
        browser.call("Page.enable", session)
        browser.call("Page.navigate", session, url=url)
        browser.wait_for("Page.loadEventFired", session)
        value = browser.call("Runtime.evaluate", session, expression=FIRST_ROWS, returnByValue=True)
        return json.loads(value["result"]["value"])
    finally:
        browser.call("Target.closeTarget", targetId=target)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium)")
def test_the_page_fits_a_phone_and_a_desktop(tricky: Path, tmp_path: Path):
    page = tricky / "report" / "index.html"
    shots = tmp_path / "shots"
    shots.mkdir()
    assert report_check.main([str(page), "--widths", "390,1280", "--out", str(shots)]) == 0
    with report_check.Browser() as browser:
        phone = measure(browser, page.resolve().as_uri(), 390)
        desktop = measure(browser, page.resolve().as_uri(), 1280)
    assert phone["thumbs"] >= 4 and desktop["thumbs"] == 6  # 6 samples a class: in one row on a desktop
    assert phone["plots"] <= 390 and desktop["plots"] <= 1280  # the plots shrink to the screen
