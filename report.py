"""report.py: one self-contained HTML page about a RISE run, to read its episodes and the §6 error analysis.

    python report.py RUN_DIR         -> writes RUN_DIR/metrics.png and RUN_DIR/report.html
    report.write_report(run_dir)     -> the same, returning the path (rise.py calls it at the end of a run)
    report.format_table(metrics)     -> the metrics as a markdown table (rise.py prints it)

The page opens offline (no CDN, no server; the plot is embedded as a data URI) and holds:
- the run's settings (config.json), the metrics table (metrics.json) and their plot (metrics.png, drawn here);
- the paper's §6 analysis, per policy, episode kind and turn: wrong attempts split into arithmetic slips
  (a stated calculation that verify.check_steps finds wrong) and other errors, and what happens between
  consecutive turns (wrong->right, right->wrong, wrong->the same wrong answer, wrong->another wrong answer);
- after "incorrect", per policy: the next attempt against a fresh sample on the same failed problems (right,
  and the same wrong answer again), from the oracle and parallel evaluations;
- every episode, browsable per policy and kind (collection, eval with oracle, without oracle, parallel) and
  filterable (solved at turn t, never solved, right then wrong): question, reference, each turn's candidates
  with the extracted answer and the arithmetic slips marked, reward, the kept candidate and, for collection,
  the advantage and AWR weight that training used (read from the trajectories; nothing is recomputed).

It reads the run directory only (config.json, metrics.json, iterK/trajectories.jsonl, eval/NAME_KIND.jsonl)
and imports nothing from rise.py. Model text is untrusted: every string goes through html.escape, and the only
script is the page's own filter. Episodes are collapsed <details> elements, whose content a browser does not
lay out until opened, so a page of thousands of episodes still opens in seconds.
"""

import argparse
import base64
import html
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from statistics import fmean

import verify

KINDS = {"collection": "collection (training data)", "oracle": "eval with oracle",
         "neutral": "eval without oracle", "parallel": "eval, parallel samples"}
SEQUENTIAL = ("collection", "oracle", "neutral")  # kinds whose turns follow one another (§6 transitions)
METRIC_LABELS = {"p1": "p1@t  (oracle, sequential)", "pass": "pass@t (parallel)",
                 "m1": "m1@t  (no oracle, sequential)", "maj": "maj@t (parallel)", "turn": "turn t alone"}
# §6 table columns: counts at turn t, then what happened from turn t to turn t+1
COLUMNS = {"n": "attempts", "wrong": "wrong", "slip": "arithmetic slip", "other": "other error",
           "pairs": "t→t+1 pairs", "wr": "wrong→right", "rw": "right→wrong", "same": "wrong→same wrong",
           "another": "wrong→another wrong", "kept": "correct steps kept (wrong→right)"}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def policy_order(name: str) -> tuple:
    """base, iter1, iter2, ..., iter10 (numerically), then anything else by name."""
    m = re.fullmatch(r"iter(\d+)", name)
    return (name != "base", int(m.group(1)) if m else 1 << 30, name)


def load_sources(run: Path) -> list[tuple[str, str, list[dict]]]:
    """(policy, kind, episodes) of every episode file, ordered by policy, then kind as in KINDS.
    iterK/trajectories.jsonl was collected by the policy before iteration K: base for iter1."""
    found = []
    for path in run.glob("iter*/trajectories.jsonl"):
        k = int(path.parent.name[4:]) if path.parent.name[4:].isdigit() else 0
        found.append(("base" if k <= 1 else f"iter{k - 1}", "collection", path))
    for path in run.glob("eval/*.jsonl"):
        name, _, kind = path.stem.rpartition("_")
        if kind in KINDS:
            found.append((name, kind, path))
    found.sort(key=lambda s: (policy_order(s[0]), list(KINDS).index(s[1])))
    return [(policy, kind, read_jsonl(path)) for policy, kind, path in found]


def steps(c: dict) -> list:
    """verify.check_steps of a candidate, computed once (it is the slow part of a report)."""
    if "_steps" not in c:
        c["_steps"] = verify.check_steps(c.get("text") or "")
    return c["_steps"]


def attempts(ep: dict, kind: str) -> list[dict]:
    """The attempts in order: the kept candidate of each turn, or for parallel eval its independent samples."""
    if kind == "parallel":
        return ep["turns"][0] if ep["turns"] else []
    return [turn[i] for turn, i in zip(ep["turns"], ep["chosen"])]


def right(c: dict) -> bool:
    return c.get("reward") == 1


def canonical(answer) -> str | None:
    return None if answer is None else verify.canonical_answer(answer)  # None: no parsable answer


def step_key(step) -> tuple:
    return re.sub(r"\s", "", step.expression), step.value


def analysis(episodes: list[dict], kind: str) -> list[Counter]:
    """The §6 counts per turn (index t-1) over the attempts each episode kept (COLUMNS says which).

    An attempt is wrong unless its reward is 1 (no parsable answer is wrong too); a wrong attempt is an
    arithmetic slip if verify.check_steps finds any stated calculation wrong, else "other". Wrong->same wrong:
    both answers have the same verify.canonical_answer (no answer twice counts as the same).
    "Correct steps kept" is pooled over the wrong->right transitions of a turn: of the calculations that were
    right in the earlier attempt (check_steps, ok), the share whose (expression without spaces, exact value)
    the new attempt states right too. "kept_steps"/"had_steps" hold numerator and denominator."""
    rows: list[Counter] = []
    for ep in episodes:
        seq = attempts(ep, kind)
        for t, c in enumerate(seq):
            if t == len(rows):
                rows.append(Counter())
            row = rows[t]
            row["n"] += 1
            if not right(c):
                row["wrong"] += 1
                row["slip" if any(not s.ok for s in steps(c)) else "other"] += 1
            if t + 1 == len(seq):
                continue
            nxt = seq[t + 1]
            row["pairs"] += 1
            if right(c):
                row["rw" if not right(nxt) else "rr"] += 1
            elif right(nxt):
                row["wr"] += 1
                had = {step_key(s) for s in steps(c) if s.ok}
                row["had_steps"] += len(had)
                row["kept_steps"] += len(had & {step_key(s) for s in steps(nxt) if s.ok})
            else:
                same = canonical(c.get("answer")) == canonical(nxt.get("answer"))
                row["same" if same else "another"] += 1
    return rows


def second_attempts(sources) -> dict[str, dict]:
    """Per policy, the paper's claim at its smallest: on the problems whose first oracle attempt is wrong,
    is the attempt after "incorrect" right more often than a fresh sample (one of the same policy's
    independent first attempts at that problem, its parallel evaluation)? And does it give the same wrong
    answer again more often than a fresh sample happens to? Rates are means over those problems."""
    found = {(policy, kind): episodes for policy, kind, episodes in sources}
    same = lambda a, b: canonical(a.get("answer")) == canonical(b.get("answer"))  # noqa: E731
    out = {}
    for policy in dict.fromkeys(policy for policy, _, _ in sources):
        fresh = {ep["id"]: attempts(ep, "parallel") for ep in found.get((policy, "parallel"), [])}
        failed = [(seq[0], seq[1], fresh[ep["id"]]) for ep in found.get((policy, "oracle"), [])
                  if len(seq := attempts(ep, "oracle")) > 1 and not right(seq[0]) and fresh.get(ep["id"])]
        if failed:
            out[policy] = {"n": len(failed),
                           "next_right": fmean(right(nxt) for _, nxt, _ in failed),
                           "fresh_right": fmean(fmean(map(right, draws)) for _, _, draws in failed),
                           "next_same": fmean(same(first, nxt) for first, nxt, _ in failed),
                           "fresh_same": fmean(fmean(same(first, c) for c in draws) for first, _, draws in failed)}
    return out


def number(x) -> str:
    """A value as its 4 significant digits, with the exact stored value in a tooltip; missing: blank."""
    return "" if x is None else f'<span title="{esc(repr(x))}">{x:.4g}</span>'


def value_text(v) -> str:
    return "undefined" if v is None else str(v.numerator) if v.denominator == 1 else f"{float(v):.6g}"


def marked_text(c: dict) -> str:
    """The attempt, escaped, with its arithmetic slips and extracted answer (its last occurrence) in <mark>s."""
    text, spans = c.get("text") or "", []
    for s in steps(c):
        # find the slip in the raw text, allowing any spacing ("3+4=8" and "3 + 4 = 8")
        if s.ok:
            continue
        chars = [ch for ch in f"{s.expression}={s.stated}" if not ch.isspace()]
        m = re.search(r"\s*".join(map(re.escape, chars)), text)
        if m:  # not found when check_steps rewrote the expression (TeX), which the header still lists
            spans.append((m.start(), m.end(), "slip", f"{s.expression} = {value_text(s.value)}, not {s.stated}"))
    answer = c.get("answer")
    if answer and (i := text.rfind(answer)) >= 0:
        spans.append((i, i + len(answer), "ans", "extracted answer"))
    out, pos = [], 0
    for start, end, cls, title in sorted(spans):
        if start >= pos:  # overlapping marks: the earlier one wins
            out += [esc(text[pos:start]), f'<mark class={cls} title="{esc(title)}">{esc(text[start:end])}</mark>']
            pos = end
    return "".join(out) + esc(text[pos:])


def candidate_html(c: dict, i: int, kept: bool, many: bool) -> str:
    reward = c.get("reward")
    cls = "r" if reward == 1 else "w" if reward == 0 else "n"
    head = [f"#{i}" if many else "", f'answer <b>{esc(c.get("answer") or "none")}</b>', f"reward {esc(reward)}"]
    if c.get("advantage") is not None or c.get("weight") is not None:
        head += [f'advantage {number(c.get("advantage")) or "–"}', f'AWR weight {number(c.get("weight")) or "–"}']
    if kept and many:
        head.append("<b>kept</b>")
    slips = [f"{s.expression} = {value_text(s.value)}, not {s.stated}" for s in steps(c) if not s.ok]
    if slips:
        head.append('<span class=sl>slips: ' + esc("; ".join(slips)) + "</span>")
    return (f'<div class="c {cls}{" kept" if kept and many else ""}"><div class=h>{" · ".join(h for h in head if h)}'
            f"</div><pre>{marked_text(c)}</pre></div>")


def episode_html(ep: dict, policy: str, kind: str) -> str:
    seq = attempts(ep, kind)
    ok = [right(c) for c in seq]
    solved = str(ok.index(True) + 1) if True in ok else "never"
    # right then wrong: some right attempt followed, later, by a wrong one
    rw = int(any(a and not b for i, a in enumerate(ok) for b in ok[i + 1:]))
    marks = "".join(f'<i class={"r" if o else "w"}>{"✓" if o else "✗"}</i>' for o in ok)
    body = []
    for t, turn in enumerate(ep["turns"]):
        title = f"{len(turn)} independent samples" if kind == "parallel" else f"turn {t + 1}"
        if t > 0:
            title += f' <small>(feedback: {esc(ep.get("feedback"))})</small>'
        chosen = ep["chosen"][t] if t < len(ep["chosen"]) else -1
        body.append(f"<h4>{title}</h4>" + "".join(
            candidate_html(c, i, i == chosen and kind != "parallel", len(turn) > 1) for i, c in enumerate(turn)))
    return (f'<details data-solved={solved} data-rw={rw}><summary>{marks} <b>{esc(ep.get("id"))}</b> '
            f'{esc((ep.get("question") or "")[:110])}</summary><div class=q><pre>{esc(ep.get("question"))}</pre>'
            f'<p>reference: <b>{esc(verify.parse_reference(ep.get("reference") or ""))}</b></p></div>'
            + "".join(body) + "</details>")


def format_table(metrics: dict) -> str:
    """A markdown table: one row per metric and turn, one column per policy, accuracy [95% interval]."""
    names = list(metrics)
    T = len(next(iter(metrics.values()))["p1"])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in METRIC_LABELS.items():
        for t in range(1, T + 1):
            cells = [f"{100 * m['acc']:.1f} [{100 * m['lo']:.1f}, {100 * m['hi']:.1f}]"
                     for m in (metrics[name][key][t - 1] for name in names)]
            lines.append(f"| {label.replace('@t', f'@{t}').replace(' t ', f' {t} ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(metrics: dict, path: Path) -> None:
    """Accuracy against turn: sequential (solid) vs parallel (dashed), with and without an oracle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = [("with an oracle", "p1", "pass"), ("without an oracle", "m1", "maj")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, seq, par) in zip(axes, panels):
        for color, (name, m) in zip(colors, metrics.items()):
            turns = range(1, len(m[seq]) + 1)
            for key, style in ((seq, "-o"), (par, "--s")):
                acc = [100 * x["acc"] for x in m[key]]
                ax.plot(turns, acc, style, color=color, label=f"{name} {key}@t", markersize=4)
                ax.fill_between(turns, [100 * x["lo"] for x in m[key]], [100 * x["hi"] for x in m[key]],
                                color=color, alpha=0.08)
        ax.set_title(title)
        ax.set_xlabel("turn t (sequential) / samples t (parallel)")
        ax.set_xticks(list(turns))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def metrics_html(metrics: dict) -> str:
    if not metrics:
        return "<p>No metrics.json yet.</p>"
    T = max(len(rows) for m in metrics.values() for rows in m.values())
    out = ["<table><tr><th>policy<th>metric" + "".join(f"<th>t={t}" for t in range(1, T + 1))]
    for policy in sorted(metrics, key=policy_order):
        for key, rows in metrics[policy].items():
            cells = "".join(f'<td title="95% Wilson interval, n={esc(r["n"])}">{100 * r["acc"]:.1f} '
                            f'<small>[{100 * r["lo"]:.1f}, {100 * r["hi"]:.1f}]</small>' for r in rows)
            out.append(f"<tr><td>{esc(policy)}<td>{esc(METRIC_LABELS.get(key, key))}{cells}")
    return "".join(out) + "</table>"


def analysis_html(sources) -> str:
    out = ["<table id=s6><tr><th>policy<th>kind<th>t" + "".join(f"<th>{esc(v)}" for v in COLUMNS.values())]
    for policy, kind, episodes in sources:
        for t, row in enumerate(analysis(episodes, kind) if kind in SEQUENTIAL else []):
            cells = {k: row[k] for k in COLUMNS}
            had = row["had_steps"]
            cells["kept"] = f'{row["kept_steps"] / had:.0%} ({row["kept_steps"]}/{had})' if had else "–"
            out.append(f'<tr data-row="{esc(policy)}/{kind}/{t + 1}"><td>{esc(policy)}<td>{KINDS[kind]}<td>{t + 1}'
                       + "".join(f"<td data-k={k}>{v}" for k, v in cells.items()))
    return "".join(out) + "</table>"


SECOND = {"n": "first attempt wrong", "next_right": "next attempt right", "fresh_right": "a fresh sample right",
          "next_same": "next attempt repeats the wrong answer", "fresh_same": "a fresh sample gives that answer"}


def second_attempts_html(sources) -> str:
    out = ["<table id=second><tr><th>policy" + "".join(f"<th>{esc(v)}" for v in SECOND.values())]
    for policy, row in second_attempts(sources).items():
        cells = "".join(f"<td data-k={k}>{v if k == 'n' else f'{100 * v:.1f}%'}" for k, v in row.items())
        out.append(f'<tr data-row="second/{esc(policy)}"><td>{esc(policy)}{cells}')
    return "".join(out) + "</table>"


STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}:is(td,th):nth-child(-n+2){text-align:left;white-space:nowrap}small{color:#777}
.flex{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start;font-size:12px}img{width:600px;max-width:100%}
.settings{columns:4;font-size:12px}.settings div{break-inside:avoid}
pre{white-space:pre-wrap;margin:.2em 0;font:12px/1.35 ui-monospace,monospace}details{border-bottom:1px solid #eee}
summary{cursor:pointer;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}i{font-style:normal;font-weight:bold}
i.r{color:#1a7f37}i.w{color:#c62828}.c{border-left:4px solid #ccc;margin:.3em 0 .3em 1em;padding-left:.5em}
.c.r{border-color:#1a7f37}.c.w{border-color:#c62828}.c.n{border-color:#999}.kept{background:#f5f8ff}
.h{font-size:12px;color:#444}.sl{color:#c62828}mark.ans{background:#ffe066}mark.slip{background:#ffcdd2;
text-decoration:underline wavy #c62828}.q{background:#fafafa;padding:.3em .6em}h4{margin:.5em 0 .2em}"""

SCRIPT = """const $ = id => document.getElementById(id);
function show() {  // one policy/kind at a time, episodes matching the filter
  const src = $('src').value, f = $('filter').value; let n = 0;
  for (const s of document.querySelectorAll('section.eps')) {
    s.hidden = s.dataset.src !== src;
    if (s.hidden) continue;
    for (const e of s.querySelectorAll('details')) {
      e.hidden = !(f === 'all' || (f === 'rw' ? e.dataset.rw === '1' : e.dataset.solved === f)); n += !e.hidden;
    }
  }
  $('count').textContent = n + ' episodes shown';
}
$('src').onchange = $('filter').onchange = show; show();"""


def render(run: Path) -> str:
    """The whole page for a run directory."""
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    png = run / "metrics.png"
    data = base64.b64encode(png.read_bytes()).decode() if png.is_file() else ""
    image = f'<img alt="accuracy against turn" src="data:image/png;base64,{data}">' if data else "<p>No plot.</p>"
    sources = load_sources(run)
    T = max([len(attempts(ep, kind)) for _, kind, eps in sources for ep in eps] or [0])
    options = "".join(f'<option value="{esc(p)}/{k}">{esc(p)} · {KINDS[k]} ({len(eps)})' for p, k, eps in sources)
    filters = ("<option value=all>all<option value=never>never solved<option value=rw>right then wrong"
               + "".join(f"<option value={t}>solved at turn {t}" for t in range(1, T + 1)))
    sections = "".join(f'<section class=eps data-src="{esc(p)}/{k}"><h3>{esc(p)} · {KINDS[k]}</h3>'
                       + "".join(episode_html(ep, p, k) for ep in eps) + "</section>" for p, k, eps in sources)
    settings = "".join(f"<div><b>{esc(k)}</b> {esc(json.dumps(v))}</div>" for k, v in config.items())
    return f"""<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>RISE run {esc(run.name)}</title>
<style>{STYLE}</style></head><body><h1>RISE run <code>{esc(run.resolve().name)}</code></h1>
<h2>Settings</h2><div class=settings>{settings}</div><h2>Metrics</h2><p>Accuracy in %, 95% Wilson interval
in brackets. Sequential: p1@t (oracle, solved by turn t), m1@t (majority over t turns); parallel: pass@t and
maj@t over t independent first-turn samples.</p><div class=flex>{metrics_html(metrics)}{image}</div>
<h2>Error analysis (§6)</h2><p>Per turn, over the attempts each episode kept. Arithmetic slip: a stated
calculation that <code>verify.check_steps</code> finds wrong. Correct steps kept: of the right calculations of
a wrong attempt followed by a right one, the share the right one states too.</p>{analysis_html(sources)}
<h2>After "incorrect": the next attempt against a fresh sample</h2><p>The problems whose first attempt
with the oracle is wrong: how often the attempt that follows "incorrect" is right, against a fresh sample
of the same policy on the same problem (its parallel samples, first attempts that saw no feedback), and how
often each gives the first attempt's wrong answer. Sequential turns help only where the first column beats
the second.</p>{second_attempts_html(sources)}
<h2>Episodes</h2><p><select id=src>{options}</select> <select id=filter>{filters}</select> <span id=count></span>
<br><small>✓/✗: the attempts kept, in order. <mark class=ans>answer</mark> extracted answer,
<mark class=slip>3+4=8</mark> arithmetic slip.</small></p>{sections}<script>{SCRIPT}</script></body></html>"""


def write_report(run_dir) -> Path:
    """Draw RUN_DIR/metrics.png from metrics.json, write RUN_DIR/report.html (atomically, so a browser never sees
    half a page) and return its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory {run}")
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    if metrics:  # the plot is drawn from metrics.json each time, so it is never stale
        plot(metrics, run / "metrics.png")
    path, tmp = run / "report.html", run / ".report.html.tmp"
    # errors="replace": a lone surrogate in model text must not stop the report
    tmp.write_text(render(run), encoding="utf-8", errors="replace")
    os.replace(tmp, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write RUN_DIR/report.html, a self-contained page about a run.")
    parser.add_argument("run_dir", type=Path, help="a directory rise.py wrote (--out)")
    run = parser.parse_args().run_dir
    if not run.is_dir():
        print(f"report.py: {run}: no such run directory", file=sys.stderr)
        sys.exit(2)
    print(write_report(run))


if __name__ == "__main__":
    main()
