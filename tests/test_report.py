"""Tests of report.py: the HTML report of a tiny hand-written run directory, parsed back with the stdlib
HTML parser (episodes per policy and kind, filters, the §6 counts worked out by hand, escaping of model
text, the advantages and weights shown), the command line, and the size and time of a 2,000-episode report."""

import base64
import json
import subprocess
import sys
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import report  # noqa: E402

QUESTION = "Tom has 3 apples and buys 4 more, then doubles them. How many apples?"
REFERENCE = "3 + 4 = <<3+4=7>>7\n7 * 2 = <<7*2=14>>14\n#### 14"
EVIL = "<script>alert(1)</script></div><b>x</b> so 3 + 4 = 7\n#### 9\n</pre></details><script>alert(2)</script>"
# attempt texts: (text, extracted answer, reward); comments say how the §6 analysis classifies them
RIGHT = ("3 + 4 = 7 apples. 7 * 2 = 14.\n#### 14", "14", 1.0)  # right; steps 3+4=7, 7*2=14
RIGHT2 = ("4 + 3 = 7, 2 * 7 = 14\n#### 14", "14", 1.0)  # right, but states none of OTHER's steps
SLIP = ("3 + 4 = 7 apples. 7 * 2 = 15.\n#### 15", "15", 0.0)  # wrong, arithmetic slip (7*2 = 15)
SLIP2 = ("3+4=8\n#### 8", "8", 0.0)  # wrong, arithmetic slip
OTHER = ("3 + 4 = 7 apples.\n#### 7", "7", 0.0)  # wrong, no slip: other
OTHER2 = ("I think it is 12.\n#### 12", "12", 0.0)  # wrong, other
BAD = (EVIL, "9", 0.0)  # wrong, other, with markup in it
NOANS = ("I do not know.", None, -1.0)  # no answer: wrong, other
LAST = ("so 3 + 4 = 8", "8", 0.0)  # the answer (last number) sits inside the slip
ADV, WEIGHT = 0.7071067811865476, 2.0281149816474726


def cand(attempt, advantage=None, weight=None, train=False):
    text, answer, reward = attempt
    c = {"text": text, "answer": answer, "reward": reward}
    return {**c, "advantage": advantage, "weight": weight} if train else c  # eval records have no such keys


def episode(i, feedback, turns, chosen=None):
    return {"id": f"q{i}", "question": QUESTION, "reference": REFERENCE, "feedback": feedback,
            "chosen": chosen or [0] * len(turns), "turns": turns}


def write_jsonl(path: Path, episodes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(ep) + "\n" for ep in episodes))


def metric(acc, n=3):
    return {"acc": acc, "lo": max(0.0, acc - 0.2), "hi": min(1.0, acc + 0.2), "n": n}


def make_run(run: Path) -> None:
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "toy", "turns": 3, "samples": 2, "beta": 1.0,
                                                 "weighting": "awr", "lr": 3e-05}))
    (run / "metrics.json").write_text(json.dumps({
        name: {k: [metric(a), metric(a + 0.1), metric(a + 0.2)] for k in ("p1", "m1", "pass", "maj", "turn")}
        for name, a in (("base", 0.368), ("iter1", 0.5))}))
    (run / "metrics.png").write_bytes(b"a stale plot")
    # collection of iteration 1, by the base policy, oracle feedback, 2 candidates a turn
    write_jsonl(run / "iter1" / "trajectories.jsonl", [
        episode(1, "oracle", [[cand(SLIP2, -1.0, 0.36787944117144233, True),
                               cand(RIGHT, 1.0, 2.718281828459045, True)]], chosen=[1]),
        # turn 1: all candidates scored the same, so not trained (advantage and weight null)
        episode(2, "oracle", [[cand(BAD, train=True), cand(OTHER2, train=True)],
                              [cand(RIGHT, ADV, WEIGHT, True), cand(NOANS, -ADV, 0.4930686913952398, True)]]),
    ])
    write_jsonl(run / "eval" / "base_oracle.jsonl", [
        episode(1, "oracle", [[cand(SLIP)], [cand(RIGHT)]]),  # solved at 2, wrong->right keeping 3+4=7
        episode(2, "oracle", [[cand(OTHER)], [cand(OTHER)], [cand(SLIP2)]]),  # never: same wrong, another wrong
    ])
    write_jsonl(run / "eval" / "base_neutral.jsonl", [
        episode(1, "neutral", [[cand(RIGHT)], [cand(SLIP)], [cand(SLIP)]]),  # right then wrong, then stuck
        episode(2, "neutral", [[cand(OTHER)], [cand(RIGHT2)], [cand(RIGHT)]]),  # wrong->right keeping nothing
        episode(3, "neutral", [[cand(NOANS)], [cand(NOANS)], [cand(OTHER2)]]),  # never solved
    ])
    write_jsonl(run / "eval" / "base_parallel.jsonl", [
        episode(1, "neutral", [[cand(OTHER), cand(RIGHT), cand(SLIP), cand(LAST)]]),
        episode(2, "neutral", [[cand(RIGHT), cand(OTHER), cand(RIGHT2), cand(NOANS)]]),
    ])
    write_jsonl(run / "eval" / "iter1_neutral.jsonl", [
        episode(1, "neutral", [[cand(RIGHT)], [cand(RIGHT)], [cand(RIGHT)]]),
    ])


class Page(HTMLParser):
    """What the tests look at: tags, text, the episodes per section, the §6 table and the <mark>s."""

    def __init__(self, text: str):
        super().__init__()
        self.starts, self.ends, self.text, self.scripts = Counter(), Counter(), [], []
        self.episodes, self.s6, self.marks, self.titles, self.urls = {}, {}, [], [], []
        self.src = self.row = self.cell = self.mark = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.starts[tag] += 1
        self.titles.append(a.get("title"))
        self.urls += [a[k] for k in ("src", "href") if k in a]
        if tag == "script":
            self.scripts.append("")
        if tag == "section":
            self.src = a["data-src"]
        if tag == "details":
            self.episodes.setdefault(self.src, []).append(a)
        if tag == "tr" and "data-row" in a:
            self.row = self.s6[a["data-row"]] = {}
        if tag == "td" and self.row is not None:
            self.cell = a.get("data-k")
        if tag == "mark":
            self.mark = [a["class"], ""]

    def handle_endtag(self, tag):
        self.ends[tag] += 1
        if tag == "mark":
            self.marks.append(tuple(self.mark))
            self.mark = None
        if tag == "table":
            self.row = None

    def handle_data(self, data):
        self.text.append(data)
        if self.lasttag == "script" and self.scripts:
            self.scripts[-1] += data
        if self.mark:
            self.mark[1] += data
        if self.row is not None and self.cell:
            self.row[self.cell] = self.row.get(self.cell, "") + data


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    make_run(run)
    path = report.write_report(run)
    assert path == run / "report.html"
    parsed = Page(path.read_text(encoding="utf-8"))
    parsed.run = run
    return parsed


def test_episodes_per_policy_and_kind(page):
    assert {src: len(eps) for src, eps in page.episodes.items()} == {
        "base/collection": 2, "base/oracle": 2, "base/neutral": 3, "base/parallel": 2, "iter1/neutral": 1}
    # filters: solved at turn t / never solved / right then wrong
    neutral = page.episodes["base/neutral"]
    assert [e["data-solved"] for e in neutral] == ["1", "2", "never"]
    assert [e["data-rw"] for e in neutral] == ["1", "0", "0"]
    assert [e["data-solved"] for e in page.episodes["base/parallel"]] == ["2", "1"]  # q1: its 2nd sample
    assert [e["data-solved"] for e in page.episodes["base/collection"]] == ["1", "2"]


def test_section6_counts(page):
    def row(src, t):
        cells = page.s6[f"{src}/{t}"]
        return {k: (v if k == "kept" else int(v)) for k, v in cells.items()}
    zero = dict.fromkeys(report.COLUMNS, 0) | {"kept": "–"}
    # collection, kept attempts: q1 [RIGHT], q2 [BAD, RIGHT] (BAD's 3+4=7 is kept)
    assert row("base/collection", 1) == zero | dict(n=2, wrong=1, other=1, pairs=1, wr=1, kept="100% (1/1)")
    assert row("base/collection", 2) == zero | dict(n=1)
    # oracle: q1 [SLIP, RIGHT]; q2 [OTHER, OTHER, SLIP2]
    assert row("base/oracle", 1) == zero | dict(n=2, wrong=2, slip=1, other=1, pairs=2, wr=1, same=1,
                                                 kept="100% (1/1)")
    assert row("base/oracle", 2) == zero | dict(n=2, wrong=1, other=1, pairs=1, another=1)
    assert row("base/oracle", 3) == zero | dict(n=1, wrong=1, slip=1)
    # neutral: q1 [RIGHT, SLIP, SLIP]; q2 [OTHER, RIGHT2, RIGHT]; q3 [NOANS, NOANS, OTHER2]
    assert row("base/neutral", 1) == zero | dict(n=3, wrong=2, other=2, pairs=3, rw=1, wr=1, same=1,
                                                  kept="0% (0/1)")
    assert row("base/neutral", 2) == zero | dict(n=3, wrong=2, slip=1, other=1, pairs=3, same=1, another=1)
    assert row("base/neutral", 3) == zero | dict(n=3, wrong=2, slip=1, other=1)
    assert row("iter1/neutral", 1) == zero | dict(n=1, pairs=1)
    assert not any(key.startswith("base/parallel") for key in page.s6)  # independent samples: no transitions


def test_second_attempt_against_a_fresh_sample(page):
    # base oracle: q1 SLIP (15) then RIGHT, q2 OTHER (7) then OTHER again; its parallel samples:
    # q1 [OTHER 7, RIGHT 14, SLIP 15, LAST 8], 1 of 4 right, 1 of 4 gives 15; q2 [RIGHT, OTHER 7, RIGHT2, NOANS],
    # 2 of 4 right, 1 of 4 gives 7. iter1 has no oracle evaluation, so no row.
    assert page.s6["second/base"] == {"n": "2", "next_right": "50.0%", "fresh_right": "37.5%",
                                      "next_same": "50.0%", "fresh_same": "25.0%"}
    assert not any(key.startswith("second/iter1") for key in page.s6)


def test_model_text_is_escaped(page):
    # the one script is the page's own filter; the attempt's markup shows as text
    assert page.starts["script"] == 1 and "function show()" in page.scripts[0]
    assert "alert" not in page.scripts[0]
    text = "".join(page.text)
    assert EVIL in text
    assert page.starts["div"] == page.ends["div"] and page.starts["b"] == page.ends["b"]


def test_answers_slips_and_weights_shown(page):
    assert ("slip", "7 * 2 = 15") in page.marks and ("slip", "3+4=8") in page.marks
    assert ("ans", "14") in page.marks and ("ans", "9") in page.marks
    text = "".join(page.text)
    assert ("slip", "3 + 4 = 8") in page.marks and "3 + 4 = 88" not in text  # overlapping marks: text once
    assert "7 * 2 = 14, not 15" in text and "kept" in text
    # advantage and AWR weight as stored: 4 digits on the page, the exact value in the tooltip
    for value in (ADV, -ADV, WEIGHT, 2.718281828459045, 0.36787944117144233, -1.0):
        assert repr(value) in page.titles and f"{value:.4g}" in text
    assert "reference: 14" in text


def test_settings_metrics_and_plot_offline(page):
    text = "".join(page.text)
    assert "weighting" in text and '"awr"' in text and "3e-05" in text
    assert "36.8" in text and "56.8" in text and "p1@t  (oracle, sequential)" in text  # base, t = 1 and t = 3
    # metrics.png is drawn again from metrics.json (replacing the stale one) and embedded
    [img] = [u for u in page.urls if u.startswith("data:image/png;base64,")]
    png = base64.b64decode(img.split(",", 1)[1])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == (page.run / "metrics.png").read_bytes()
    assert all(u.startswith("data:") for u in page.urls)  # nothing to fetch: opens offline


def test_markdown_table():
    metrics = {"base": {k: [metric(0.368), metric(0.5)] for k in report.METRIC_LABELS}}
    table = report.format_table(metrics).splitlines()
    assert table[0] == "| metric | base |" and len(table) == 2 + 2 * len(report.METRIC_LABELS)
    assert "| p1@2  (oracle, sequential) | 50.0 [30.0, 70.0] |" in table


def test_empty_run(tmp_path):
    page = Page(report.write_report(tmp_path).read_text(encoding="utf-8"))
    assert "No metrics.json yet." in "".join(page.text) and page.episodes == {} and page.starts["script"] == 1


def test_command_line(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    done = subprocess.run([sys.executable, "report.py", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (run / "report.html").stat().st_size > 1000 and done.stdout.strip() == str(run / "report.html")
    missing = tmp_path / "no-such-run"
    done = subprocess.run([sys.executable, "report.py", str(missing)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and str(missing) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_big_run_stays_usable(tmp_path):
    """2,000 episodes (1,000 collected with 3 turns x 2 candidates, 1,000 evaluated over 3 turns) with
    GSM8K-sized attempts of ~300 characters: a few seconds, a file well under 15 MB."""
    run = tmp_path / "big"
    make_run(run)
    long = [(f"Step {k}: " + t * 4, a, r) for k, (t, a, r) in enumerate([RIGHT, SLIP, OTHER, BAD] * 2)]
    write_jsonl(run / "iter1" / "trajectories.jsonl", [
        episode(i, "oracle", [[cand(long[(i + t) % 8], 0.5, 1.6, True), cand(long[(i + t + 1) % 8], -0.5, 0.6, True)]
                              for t in range(3)]) for i in range(1000)])
    write_jsonl(run / "eval" / "base_neutral.jsonl",
                [episode(i, "neutral", [[cand(long[(i * 3 + t) % 8])] for t in range(3)]) for i in range(1000)])
    start = time.perf_counter()
    path = report.write_report(run)
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    print(f"2,000 episodes: {seconds:.1f} s, {size / 1e6:.1f} MB")
    assert size < 15e6 and seconds < 30
    episodes = Page(path.read_text(encoding="utf-8")).episodes
    assert len(episodes["base/collection"]) == len(episodes["base/neutral"]) == 1000
