"""rise.py: AWR arithmetic against hand-computed values, the loss mask, one AWR step, the metrics on
hand-written trajectories, and whole tiny runs (checkpoint loads in transformers; --resume)."""

import dataclasses
import json
import math
import os

import pytest
import torch
import transformers

import checks
import data
import model as M
import rise
import toy
from data import Candidate, Episode


def test_advantages_and_weights_by_hand():
    rewards = [1.0, 0.0, 0.0, -1.0]  # mean 0
    assert rise.advantages(rewards) == [1.0, 0.0, 0.0, -1.0]
    std = math.sqrt((1 + 0 + 0 + 1) / 4)
    assert rise.advantages(rewards, normalize=True) == pytest.approx([1 / std, 0, 0, -1 / std], rel=1e-4)
    assert rise.advantages([1.0, 0.0, 0.0, 0.0]) == [0.75, -0.25, -0.25, -0.25]
    assert rise.awr_weights([0.75, -0.25], beta=0.5, max_weight=20) == pytest.approx([math.exp(1.5), math.exp(-0.5)])
    assert rise.awr_weights([5.0, 0.0], beta=1.0, max_weight=20) == [20.0, 1.0]  # clipped at the maximum
    # the official code's weighting: exp(reward / 0.4) on the kept candidate alone, no baseline, no clip
    turns = [[Candidate("a", "1", -1.0), Candidate("b", "2", 0.0)],
             [Candidate("c", None, 0.0), Candidate("d", "3", 1.0)]]
    episode = Episode(data.Problem("q", "#### 3", "q0"), "oracle", turns, [0, 1])
    rise.weigh([episode], rise.Config(weighting="official"))
    assert [[c.weight for c in turn] for turn in turns] == [[pytest.approx(math.exp(-2.5)), None],
                                                            [None, pytest.approx(math.exp(2.5))]]


def test_wilson_interval_by_hand():
    lo, hi = rise.wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert rise.wilson_interval(0, 10)[0] == 0.0 and rise.wilson_interval(10, 10)[1] == 1.0


def examples_of(episodes, policy):
    """The training examples of episodes that rise.weigh has weighted, for this policy."""
    return data.training_examples(episodes, policy.tokenizer, policy.prompts, policy.model.args.eos_ids)


def cand(answer, right):
    return Candidate(f"#### {answer}", answer, 1.0 if right else (0.0 if answer is not None else -1.0))


def test_metrics_from_hand_written_trajectories():
    p = data.Problem("q", "#### 7", "p")
    # sequential episodes: (answers per turn, right?)
    seq = [Episode(p, "neutral", [[cand("3", False)], [cand("7", True)], [cand("7", True)]], [0, 0, 0]),
           Episode(p, "neutral", [[cand("7", True)], [cand("3", False)], [cand("3", False)]], [0, 0, 0]),
           Episode(p, "neutral", [[cand(None, False)], [cand("4", False)], [cand("7", True)]], [0, 0, 0])]
    assert rise.p1_at(seq, 1) == [False, True, False]
    assert rise.p1_at(seq, 3) == [True, True, True]
    # m1@2: tie 3 vs 7 -> the most recent (7) for ep0; 7 vs 3 -> 3 for ep1; ep2: None does not vote, 4 wins
    assert rise.m1_at(seq, 2) == [True, False, False]
    assert rise.m1_at(seq, 3) == [True, False, True]  # ep2: 4 vs 7 tie -> the latest, 7
    parallel = [Episode(p, "neutral", [[cand("3", False), cand("7", True), cand("3", False)]], [0])]
    assert rise.pass_at(parallel, 1) == [False] and rise.pass_at(parallel, 2) == [True]
    assert rise.maj_at(parallel, 2) == [True] and rise.maj_at(parallel, 3) == [False]
    # kept candidates decide `correct`, not the best of the turn
    ep = Episode(p, "oracle", [[cand("3", False), cand("7", True)]], [1])
    assert ep.correct == [True] and ep.attempts == ["#### 7"]


@pytest.fixture(scope="module")
def toy_policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy")
    tok = data.Tokenizer(toy.write_tokenizer(path / "tok"))
    torch.manual_seed(0)
    args = toy.model_args(toy.Recipe(dim=64, n_layers=2), tok.vocab_size)
    args.eos_ids = (tok.eos_id,)
    return rise.Policy(M.Transformer(args).eval(), tok, data.TOY_PROMPTS)


def test_training_examples_mask_exactly_the_candidate(toy_policy):
    p = data.Problem("Ann has 2 cups. She gets 3 more. How many cups now?", "2+3=5\n#### 5", "t")
    turn1 = [Candidate("2+3=6\n#### 6", "6", 0.0), Candidate("2+3=5\n#### 5", "5", 1.0)]
    turn2 = [Candidate("2+3=5\n#### 5", "5", 1.0), Candidate("2+3=7\n#### 7", "7", 0.0)]
    ep = Episode(p, "oracle", [turn1, turn2], [0, 0])
    cfg = rise.Config(normalize_advantages=False, beta=1.0)
    rise.weigh([ep], cfg)
    examples = examples_of([ep], toy_policy)
    tok = toy_policy.tokenizer
    assert [e.turn for e in examples] == [1, 1, 2, 2]
    assert [e.weight for e in examples] == pytest.approx([math.exp(-0.5), math.exp(0.5), math.exp(0.5), math.exp(-0.5)])
    for e, c in zip(examples, turn1 + turn2):
        trained = [i for i, m in zip(e.ids, e.mask) if m]
        assert tok.decode(trained, skip_special_tokens=False) == c.text + "</a>"
        # the state before it: the question, and at turn 2 the kept (wrong) first attempt + oracle feedback
        context = tok.decode([i for i, m in zip(e.ids, e.mask) if not m], skip_special_tokens=False)
    assert context == f"<u>{p.question}<a>2+3=6\n#### 6</a><u>Wrong. {p.question}<a>"
    # uniform turns carry no signal and are dropped; the official weighting keeps only the kept attempts
    assert [c.advantage for c in turn1 + turn2] == [-0.5, 0.5, 0.5, -0.5]  # stored with the trajectories
    flat = Episode(p, "oracle", [[Candidate("2+3=6\n#### 6", "6", 0.0), Candidate("2+3=6\n#### 6", "6", 0.0)]], [0])
    rise.weigh([flat], cfg)
    assert examples_of([flat], toy_policy) == []
    official = Episode(p, "oracle", [[Candidate(c.text, c.answer, c.reward) for c in turn] for turn in (turn1, turn2)],
                       [0, 0])
    rise.weigh([official], rise.Config(weighting="official"))
    official = examples_of([official], toy_policy)
    assert [e.weight for e in official] == pytest.approx([math.exp(0.0), math.exp(2.5)])  # kept: wrong, right


def random_examples(vocab: int, g: torch.Generator) -> list[data.Example]:
    """Two states of 7 and 4 tokens: three attempts at the first (one of them trained from its first token
    to the end), one at the second, and one example alone in its row."""
    first, second = torch.randint(0, vocab, (7,), generator=g).tolist(), torch.randint(0, vocab, (4,), generator=g).tolist()
    examples = []
    for state, attempt_lengths in ((first, (5, 2, 3)), (second, (6,)), ([9, 8, 7, 6, 5, 4], (1,))):
        for n in attempt_lengths:
            attempt = torch.randint(0, vocab, (n,), generator=g).tolist()
            examples.append(data.Example(state + attempt, [0] * len(state) + [1] * n, 0.5 + n, 1))
    return examples


def test_awr_loss_is_the_weighted_mean_nll_of_the_trained_tokens(toy_policy):
    """Packed rows (a state once, then its attempts) give each example the loss of its own unpacked row,
    with the output matrix run at trained positions only."""
    g = torch.Generator().manual_seed(0)
    model = toy_policy.model
    examples = random_examples(model.args.vocab_size, g)
    ids, positions, segments, targets, owner = rise.pack(examples, 0, "cpu")
    assert len(ids) == 3 and ids.shape[1] == 6 + (1 + 5) + (1 + 2) + (1 + 3)  # the state, then its 3 attempts
    assert (owner >= 0).sum() == sum(sum(e.mask[1:]) for e in examples)
    weights = torch.tensor([e.weight for e in examples])
    expected = 0
    with torch.no_grad():
        for e, w in zip(examples, weights):
            row, mask = torch.tensor([e.ids]), torch.tensor(e.mask[1:], dtype=torch.float)
            logp = torch.log_softmax(model(row[:, :-1]).float(), -1)[0].gather(-1, row[0, 1:, None])[:, 0]
            expected = expected + w * -(logp * mask).sum() / mask.sum()
        loss = rise.awr_loss(model, (ids, positions, segments, targets, owner), weights)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_packed_rows_give_each_attempt_its_own_rows_logits(tiny_checkpoints):
    """model.forward(packed=...): every position of an attempt sees the state and the attempt, never
    another attempt in the row, at its own position; also with a sliding window (Mistral)."""
    for name in ("llama3_gqa", "mistral_window"):
        model = M.load(tiny_checkpoints[name], dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        examples = random_examples(model.args.vocab_size, g)
        ids, positions, segments, _, _ = rise.pack(examples, 0, "cpu")
        with torch.no_grad():
            packed = model(ids, packed=(positions, segments))[0]
            for k, e in enumerate(examples[:3]):  # the three attempts at the first state, all in row 0
                alone = model(torch.tensor([e.ids]))[0]
                assert torch.allclose(packed[segments[0] == 0], alone[:6], atol=1e-4), name
                assert torch.allclose(packed[segments[0] == k + 1], alone[6:], atol=1e-4), name


def pens_episode() -> Episode:
    """One turn of four candidates, the first right, weighted by AWR (beta 0.5)."""
    p = data.Problem("Bob has 9 pens. He loses 4. How many pens now?", "9-4=5\n#### 5", "t")
    cands = [Candidate("9-4=5\n#### 5", "5", 1.0)] + [Candidate(f"9-4={v}\n#### {v}", str(v), 0.0) for v in (3, 6, 7)]
    episode = Episode(p, "oracle", [cands], [0])
    rise.weigh([episode], rise.Config(beta=0.5))
    return episode


def test_one_awr_step_raises_the_correct_candidate_most(toy_policy):
    torch.manual_seed(0)
    policy = rise.Policy(M.Transformer(toy_policy.model.args), toy_policy.tokenizer, data.TOY_PROMPTS)
    episode = pens_episode()
    examples = examples_of([episode], policy)

    def loglik():
        batch = rise.pack(examples, policy.tokenizer.pad_id, "cpu")
        with torch.no_grad():
            logp = rise.token_logprobs(policy.model, *batch)
            return torch.zeros(len(examples)).index_add_(0, batch[-1][batch[-1] >= 0], logp).tolist()

    before = loglik()
    cfg = rise.Config(lr=1e-3, epochs=1, batch_size=4, micro_batch=2, warmup=0.0)
    rise.train(policy.model, examples, cfg, policy.tokenizer.pad_id)
    gain = [a - b for a, b in zip(loglik(), before)]
    assert gain[0] > 0 and gain[0] > max(gain[1:])


def test_training_hands_freed_memory_back_before_every_step(toy_policy, monkeypatch):
    """Each step's activations are freed into glibc's heap in fragments; without a trim per step they add up
    (docs/performance.md: the recipe's training peak 6.4 -> 5.3 GB)."""
    episode = pens_episode()
    calls = []
    monkeypatch.setattr(rise, "release_freed_memory", lambda: calls.append(1))
    cfg = rise.Config(lr=1e-4, epochs=2, batch_size=2, micro_batch=1, warmup=0.0)
    model = M.Transformer(toy_policy.model.args)  # a copy: the fixture is shared
    stats = rise.train(model, examples_of([episode], toy_policy), cfg, toy_policy.tokenizer.pad_id)
    assert stats["steps"] == 4 and len(calls) == 4  # 2 epochs of 4 examples in steps of 2, not per micro-batch


def tiny_run_args(out, *extra):
    return ["--toy-pretrain-steps", "40", "--train-problems", "12", "--eval-problems", "10", "--turns", "2",
            "--samples", "3", "--iterations", "1", "--keep-uniform-turns", "--lr", "1e-3", "--out", str(out), *extra]


def test_tiny_run_writes_a_checkpoint_both_load(tmp_path):
    rise.main(tiny_run_args(tmp_path / "run"))
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"base", "iter1"}
    for name in metrics:
        assert set(metrics[name]) >= {"p1", "m1", "pass", "maj"}
        assert all(len(metrics[name][k]) == 2 and set(metrics[name][k][0]) >= {"acc", "lo", "hi"}
                   for k in ("p1", "m1", "pass", "maj"))
    assert (out / "metrics.png").stat().st_size > 1000
    assert len((out / "iter1" / "trajectories.jsonl").read_text().splitlines()) == 12
    # the report of the run: every episode of every stage, and each trained candidate's weight as stored
    from tests.test_report import Page
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    kinds = {f"{name}/{kind}": 10 for name in ("base", "iter1") for kind in ("oracle", "neutral", "parallel")}
    assert {src: len(eps) for src, eps in page.episodes.items()} == {**kinds, "base/collection": 12}
    weights = [c["weight"] for ep in data.episodes_from_jsonl((out / "iter1" / "trajectories.jsonl").read_text())
               for turn in ep.turns for c in map(dataclasses.asdict, turn) if c["weight"] is not None]
    assert weights and all(repr(w) in page.titles for w in weights)
    ours, tok = M.load(out / "iter1" / "policy", device="cpu"), data.Tokenizer(out / "iter1" / "policy")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "iter1" / "policy", dtype=torch.float32)
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "Ann has 3 eggs."}]),
                                   add_special_tokens=False)])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4
    base = M.load(toy.build_base(checks.pretrain, toy.recipe(40)), device="cpu")
    assert not torch.equal(base(ids), ours(ids))  # training changed the policy


def test_resume_after_interruption_reaches_the_same_result(tmp_path, monkeypatch, capsys):
    rise.main(tiny_run_args(tmp_path / "straight"))
    real_train = rise.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rise, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rise.main(tiny_run_args(tmp_path / "resumed"))
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())["done"]
    assert state == ["eval:base", "collect:1"] and not (tmp_path / "resumed" / "iter1" / "policy").exists()
    with pytest.raises(SystemExit) as exit:
        rise.main(tiny_run_args(tmp_path / "resumed"))
    assert exit.value.code == 2 and "pass --resume" in capsys.readouterr().err
    monkeypatch.setattr(rise, "train", real_train)
    rise.main(tiny_run_args(tmp_path / "resumed", "--resume"))
    for name in ("metrics.json", "iter1/trajectories.jsonl"):
        assert (tmp_path / "straight" / name).read_text() == (tmp_path / "resumed" / name).read_text()
    a = M.load(tmp_path / "straight" / "iter1" / "policy", device="cpu")
    b = M.load(tmp_path / "resumed" / "iter1" / "policy", device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_rise_distill_the_teacher_writes_turns_2_to_T(toy_policy):
    """A teacher whose every token ends its turn writes empty attempts: they must fill exactly turns 2..T."""
    torch.manual_seed(1)
    student = rise.Policy(M.Transformer(toy_policy.model.args).eval(), toy_policy.tokenizer, data.TOY_PROMPTS)
    for p in student.model.parameters():  # weights large enough that it writes text, not only special tokens
        torch.nn.init.normal_(p, std=0.1)
    args = dataclasses.replace(student.model.args, eos_ids=tuple(range(student.model.args.vocab_size)))
    teacher = rise.Policy(M.Transformer(args).eval(), student.tokenizer, data.TOY_PROMPTS)
    teacher.model.load_state_dict(student.model.state_dict())
    problems = toy.make_problems(6, seed=1)
    cfg = rise.Config(max_new_tokens=12, temperature=1.0, device="cpu")
    distilled = rise.rollout(student, problems, cfg, [2, 2, 2], "neutral", teacher=teacher)
    alone = rise.rollout(student, problems, cfg, [2, 2, 2], "neutral")
    texts = lambda episodes, t: [c.text for ep in episodes for c in ep.turns[t]]  # noqa: E731
    assert all(len(ep.turns) == 3 for ep in distilled)
    assert texts(distilled, 0) == texts(alone, 0) and any(texts(alone, 0))  # turn 1: the policy's own
    for t in (1, 2):
        assert set(texts(distilled, t)) == {""} and any(texts(alone, t))  # later turns: the teacher's


@pytest.mark.parametrize("widths", [[1, 3, 3], [3, 3, 3]])
def test_one_sample_at_turn_1_then_best_of_n_continues_from_it(toy_policy, monkeypatch, widths):
    """--first-samples 1 (the official recipe): one row per episode at turn 1, N rows after it, each a
    copy of that row's cache; greedy, the N copies write what a 1-row rollout writes. A turn's new
    tokens are encoded once per episode (one row each), and its N rows then start from that cache."""
    torch.manual_seed(2)
    policy = rise.Policy(M.Transformer(toy_policy.model.args).eval(), toy_policy.tokenizer, data.TOY_PROMPTS)
    for p in policy.model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    problems = toy.make_problems(4, seed=2)
    cfg = rise.Config(max_new_tokens=10, temperature=0.0, device="cpu")
    narrow = rise.rollout(policy, problems, cfg, [1, 1, 1], "neutral")
    calls, generate = [], M.generate
    monkeypatch.setattr(M, "generate",
                        lambda model, prompts, **kw: calls.append(prompts) or generate(model, prompts, **kw))
    wide = rise.rollout(policy, problems, cfg, widths, "neutral")
    for width in widths:  # an encoding call of one row per episode, then a sampling call of `width` rows
        encode, sampled = (calls.pop(0), calls.pop(0)) if width > 1 else ([], calls.pop(0))
        assert len(encode) == (4 if width > 1 else 0) and len(sampled) == 4 * width
        assert width == 1 or all(len(p) == 1 for p in sampled)
    assert all([len(turn) for turn in ep.turns] == widths for ep in wide)
    for w, n in zip(wide, narrow):
        assert [[c.text for c in turn] for turn in w.turns] == [[c.text for c in turn] * len(wt)
                                                                 for turn, wt in zip(n.turns, w.turns)]


def test_keep_first_goes_on_from_the_first_candidate_even_when_another_is_right(toy_policy, monkeypatch):
    """--keep first: the episode continues from candidate 0 (an ordinary sample), so the oracle stops it
    only when that one is right; --keep best continues from the first right one, which ends it."""
    problem = toy.make_problems(1, seed=3)[0]
    cfg = rise.Config(max_new_tokens=4, device="cpu")
    for keep, chosen in [("best", [1]), ("first", [0, 0, 0])]:
        rewards = iter([0.0, 1.0, 0.0, 1.0] * 3)  # the scores of the candidates, in sampling order
        monkeypatch.setattr(rise, "score", lambda p, text: Candidate(text, None, next(rewards)))
        episode, = rise.rollout(toy_policy, [problem], dataclasses.replace(cfg, keep=keep), [4, 4, 4], "oracle")
        assert episode.chosen == chosen
        assert all([c.reward for c in turn] == [0.0, 1.0, 0.0, 1.0] for turn in episode.turns)


@pytest.mark.parametrize("fast", [True, False])
def test_rollouts_in_bfloat16_where_it_is_fast_training_keeps_float32_master_weights(tiny_checkpoints, fast,
                                                                                     monkeypatch, tmp_path):
    monkeypatch.setattr(rise, "fast_bf16", lambda cfg: fast)  # as on a CPU with (or without) bf16 matrix units
    path, cfg = tiny_checkpoints["tied"], rise.Config(device="cpu")
    dtype = lambda policy: policy.model.model.embed_tokens.weight.dtype  # noqa: E731
    assert dtype(rise.load_policy(path, cfg, data.GSM8K_PROMPTS)) == (torch.bfloat16 if fast else torch.float32)
    assert dtype(rise.load_policy(path, cfg, data.GSM8K_PROMPTS, training=True)) == torch.float32
    forced = dataclasses.replace(cfg, dtype="float32")  # --dtype decides where given
    assert dtype(rise.load_policy(path, forced, data.GSM8K_PROMPTS)) == torch.float32
    policy = rise.load_policy(path, cfg, data.GSM8K_PROMPTS, training=True)
    rise.save_policy(policy.model, tmp_path / "policy", path, cfg)  # saved in the rollout precision
    assert json.loads((tmp_path / "policy" / "config.json").read_text())["torch_dtype"] == \
        ("bfloat16" if fast else "float32")


def test_memory_freed_by_a_stage_goes_back_to_the_os():
    """Tensors a stage frees stay in glibc's heap for reuse; release_freed_memory returns them, so the
    next stage does not start where the last one peaked. (Run in a child: the test process's heap is shared.)"""
    import subprocess
    import sys
    script = """if True:
        import torch, rise
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
        block = torch.empty(16 << 20, dtype=torch.uint8)
        del block  # a freed mmap'd block of 16 MiB: glibc then serves smaller blocks from its heap
        blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(512)]  # 512 MiB of 1 MiB blocks, in the heap
        keep = blocks[-1]  # pins the heap's top, so only trimming inside the heap can return the rest
        del blocks
        before = rss()
        rise.release_freed_memory()
        print(before - rss())"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert int(done.stdout) > 400 << 20  # most of the 511 freed MiB were handed back
