"""The demo (examples/demo.py) trains, evaluates, checkpoints, resumes and samples with every
model family on tiny settings; its checkpoints know their corpus and options; its helpers
(threads, prompt, UTF-8 decoding, validation) do what they say; ``--compare`` runs every
family and writes its table and plot."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the demo imports its _demo_* modules as siblings

import _demo_data  # noqa: E402
import _demo_text  # noqa: E402
import _demo_threads  # noqa: E402


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = load("demo")
TINY = ["--steps", "2", "--dim", "32", "--depth", "1", "--window", "32", "--batch", "2",
        "--sample-length", "5", "--max-bytes", "30000", "--no-progress",
        "--threads", "1"]  # fmt: skip


def generator_after(draws: int, corpus, batch=2, window=32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    for _ in range(draws):
        _demo_data.random_windows(corpus.train, batch, window, generator)
    return generator.get_state()


@pytest.mark.parametrize("family", demo.FAMILIES)
def test_demo_trains_checkpoints_resumes_and_samples(family, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt.pt"
    first = demo.main(["--model", family, "--checkpoint", str(checkpoint), *TINY])
    assert first["steps"] == 2 and first["tokens"] == 2 * 2 * 32
    assert math.isfinite(first["bpc"]) and 0 < first["bpc"] < 12
    assert first["sampled"] == 5 and first["parameters"] > 0
    corpus = _demo_data.load_corpus(None, 30000)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["corpus"] == corpus.identity and saved["options"]["model"] == family
    assert torch.equal(saved["generator_state"], generator_after(2, corpus))
    resumed = demo.main(["--model", family, "--checkpoint", str(checkpoint), "--resume", *TINY])
    assert resumed["steps"] == 4 and resumed["tokens"] == 2 * first["tokens"]
    # the resumed run drew new windows (the generator continued, it was not re-seeded)
    assert torch.equal(torch.load(checkpoint)["generator_state"], generator_after(4, corpus))
    out = capsys.readouterr().out
    assert "resumed from" in out and "bits per character over 64 random windows" in out
    assert "using 1 thread (--threads)" in out
    assert _demo_text.MARKER in out or _demo_text.ASCII_MARKER in out


def test_checkpoints_refuse_another_corpus_or_model_and_warn_on_training_options(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    demo.main(["--data", str(text), *TINY])
    default = tmp_path / "runs" / "demo-linear-corpus.pt"  # the default path names the corpus
    assert default.is_file() and not (tmp_path / "runs" / "demo-linear-stdlib.pt").exists()
    with pytest.raises(SystemExit, match=r"--resume: .* was trained on .*corpus.txt .*, not on "):
        demo.main(["--checkpoint", str(default), "--resume", *TINY])
    with pytest.raises(SystemExit, match=r"--resume: .* holds a model with .*'dim': 32"):
        demo.main(["--data", str(text), "--resume", *TINY, "--dim", "64"])
    demo.main(["--data", str(text), "--resume", *TINY, "--batch", "3"])
    assert "warning: " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no checkpoint"):
        demo.main(["--checkpoint", str(tmp_path / "none.pt"), "--resume", *TINY])
    # a run without training steps leaves an existing checkpoint alone
    before = default.read_bytes()
    demo.main(["--data", str(text), *TINY, "--steps", "0"])
    assert default.read_bytes() == before


def test_seq_len_reaches_the_feedback_model_and_its_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "feedback.pt"
    options = ["--model", "feedback", "--checkpoint", str(checkpoint), *TINY]
    summary = demo.main([*options, "--seq-len", "3"])  # windows that do not divide 32
    assert summary["steps"] == 2 and summary["sampled"] == 5
    assert torch.load(checkpoint, weights_only=True)["options"]["seq_len"] == 3
    with pytest.raises(SystemExit, match=r"holds a model with .*'seq_len': 3"):
        demo.main([*options, "--resume", "--seq-len", "4"])
    # a feedback checkpoint from before --seq-len existed was trained with windows of 8
    saved = torch.load(checkpoint, weights_only=True)
    del saved["options"]["seq_len"]
    torch.save(saved, checkpoint)
    assert demo.main([*options, "--resume", "--seq-len", "8"])["steps"] == 4
    # another family ignores --seq-len, in its checkpoint too
    linear = tmp_path / "linear.pt"
    demo.main(["--checkpoint", str(linear), *TINY, "--seq-len", "5"])
    assert torch.load(linear, weights_only=True)["options"]["seq_len"] is None
    assert demo.main(["--checkpoint", str(linear), "--resume", *TINY])["steps"] == 4
    with pytest.raises(SystemExit):
        demo.parse_args(["--seq-len", "0"])
    assert "--seq-len must be >= 1; got 0" in capsys.readouterr().err


def test_compare_with_a_token_budget_gives_every_family_the_first_ones_tokens(tmp_path, capsys):
    from _demo_compare import compare

    tiny = TINY[2:]  # without "--steps 2"
    assert TINY[:2] == ["--steps", "2"]
    argv = ["--compare", "--budget", "tokens", "--minutes", "0.02", *tiny]
    summary = compare(demo.parse_args(argv), argv, ("linear", "feedback"))
    first, second = summary["runs"]
    assert first["model"] == "linear" and second["model"] == "feedback"
    assert first["steps"] >= 1 and second["steps"] == first["steps"]
    assert second["tokens"] == first["tokens"]
    out = capsys.readouterr().out
    assert f"{first['tokens']:,} training tokens (linear's in 0.02 min) per family" in out
    assert "feedback: windows of 16 tokens (seq_len)" in out
    with pytest.raises(SystemExit):
        demo.parse_args(["--budget", "tokens"])
    assert "--budget applies to --compare" in capsys.readouterr().err


def test_bad_data_and_a_tiny_corpus_give_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"^--data: no such file: .*missing.txt$"):
        demo.main(["--data", str(tmp_path / "missing.txt"), *TINY])
    text = tmp_path / "tiny.txt"
    text.write_text("too short")
    with pytest.raises(SystemExit, match="need at least 4096"):
        demo.main(["--data", str(text), *TINY])


def test_no_progress_runs_without_tqdm_and_the_bar_asks_for_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # importing tqdm now fails
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    summary = demo.main(["--checkpoint", str(tmp_path / "c.pt"), *TINY])
    assert summary["steps"] == 2
    with_bar = [a for a in TINY if a != "--no-progress"]
    with pytest.raises(SystemExit, match=r"needs tqdm: pip install -r examples/requirements\.txt"):
        demo.main(["--checkpoint", str(tmp_path / "c.pt"), *with_bar])


def test_the_time_budget_bar_has_a_total():
    from _demo_progress import Progress

    progress = Progress(None, 90.0)
    progress.update(3, 12.5, 4.0, 1000.0)
    assert progress.bar.total == 90.0 and progress.bar.n == 12.5
    progress.update(4, 200.0, 4.0, 1000.0)  # never past the total
    assert progress.bar.n == 90.0
    progress.close()


def test_threads_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _demo_threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _demo_threads.cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert _demo_threads.cgroup_cpu_limit(v1) == 3.0
    assert _demo_threads.cgroup_cpu_limit(tmp_path / "nothing") is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(_demo_threads, "cgroup_cpu_limit", lambda: 1.5)
    assert _demo_threads.available_cpus() == (1, "cgroup CPU quota 1.5")
    monkeypatch.setattr(_demo_threads, "cgroup_cpu_limit", lambda: None)
    assert _demo_threads.available_cpus() == (4, "CPU affinity")
    assert _demo_threads.plural(1, "thread") == "1 thread"
    assert _demo_threads.plural(2, "thread") == "2 threads"


def test_prompts_start_at_a_line_and_bytes_decode_incrementally():
    text = ("def f(x):\n    return x + 1\n" * 40).encode()
    tokens = torch.tensor(list(text))
    for seed in range(5):
        prompt = _demo_text.prompt_at_line_start(tokens, 20, torch.Generator().manual_seed(seed))
        assert 0 < prompt.shape[1] <= 20
        assert bytes(prompt[0].tolist()).decode().startswith(("def f", "    return"))
    sample = "héllo → wörld €"
    assert "".join(_demo_text.decode_stream(sample.encode())) == sample
    assert "".join(_demo_text.decode_stream(b"a\xffb")) == "a\ufffdb"
    assert "".join(_demo_text.decode_stream(b"a\xe2\x82")) == "a\ufffd"  # cut short
    assert _demo_text.marker_for("ascii") == "|>" and _demo_text.marker_for("utf-8") != "|>"


def test_validation_uses_64_fixed_random_windows():
    tokens = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
    seen = []

    def uniform(model, inputs):
        seen.append(inputs)
        return torch.zeros(*inputs.shape, 256)

    model = torch.nn.Linear(1, 1)
    assert _demo_data.bits_per_character(uniform, model, tokens, 16) == pytest.approx(8.0)
    first = torch.cat(seen)
    seen.clear()
    _demo_data.bits_per_character(uniform, model, tokens, 16)
    assert first.shape == (64, 16) and torch.equal(torch.cat(seen), first)
    assert len({tuple(row.tolist()) for row in first}) > 60  # distinct places
    assert model.training  # its mode is restored


def test_compare_runs_every_family_and_writes_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "docs"
    summary = demo.main(["--compare", "--compare-out", str(out), *TINY])
    assert [run["model"] for run in summary["runs"]] == list(demo.FAMILIES)
    for run in summary["runs"]:  # a validation point per step here (8 over a longer run)
        assert len(run["curve"]) == 2 and run["curve"][0][0] < run["curve"][1][0]
    table = (out / "demo_compare.md").read_text()
    for family in demo.FAMILIES:
        assert f"| {family} |" in table
    assert "validation bits/char" in table and "generation tokens/s" in table
    assert (out / "demo_compare.svg").read_text().lstrip().startswith("<?xml")


def test_the_default_thread_count_leaves_out_the_cpus_others_keep_busy(monkeypatch, tmp_path):
    monkeypatch.setattr(_demo_threads, "available_cpus", lambda: (4, "CPU affinity"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(_demo_threads.time, "sleep", lambda seconds: None)
    # two samples of /proc/stat: CPUs 0 and 1 fully busy in between, 2 and 3 idle
    samples = iter([{c: (100, 1000) for c in range(4)}, {0: (200, 1100), 1: (200, 1100),
                    2: (100, 1100), 3: (100, 1100)}])  # fmt: skip
    monkeypatch.setattr(_demo_threads, "cpu_times", lambda: next(samples))
    assert _demo_threads.default_threads() == (
        2,
        "4 CPUs usable (CPU affinity), other processes use 2.0 CPUs now: 2 busy",
    )
    # without /proc/stat, the load average decides
    monkeypatch.setattr(_demo_threads, "cpu_times", lambda: {})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 4.0, 3.0))
    assert _demo_threads.default_threads() == (4, "4 CPUs usable (CPU affinity)")
    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 4.0, 3.0))
    assert _demo_threads.default_threads() == (
        2,
        "4 CPUs usable (CPU affinity), the load average is 1.6: 2 busy",
    )
    monkeypatch.setattr(os, "getloadavg", lambda: (13.0, 4.0, 3.0))
    assert _demo_threads.default_threads()[0] == 1


def test_cpu_times_read_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  10 0 10 100 5 0 0 0 0 0\n"
        "cpu0 4 1 2 50 3 0 0 0 0 0\n"
        "cpu1 6 0 8 50 2 1 1 0 0 0\n"
        "intr 1 2 3\n"
    )
    assert _demo_threads.cpu_times(stat) == {0: (7, 60), 1: (16, 68)}
    assert _demo_threads.cpu_times(tmp_path / "missing") == {}
