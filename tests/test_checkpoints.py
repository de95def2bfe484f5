"""No silent loss of meta-training checkpoints (issue 17): checkpoint.pt is written atomically and the
one it replaces is kept as checkpoint.prev.pt; a truncated, corrupted or missing checkpoint.pt makes
--resume fail with a clear error that says the previous one is intact (and how to use it), and the
previous one then resumes exactly; a run SIGKILLed in the middle of writing a checkpoint leaves a
complete checkpoint.pt behind (tested with a real process)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from learnedopt import cli, meta
from learnedopt.meta import CheckpointError, MetaConfig, MetaTrainer, load_checkpoint, previous_path

ROOT = Path(__file__).resolve().parents[1]


def small_config(**kw):
    base = dict(task="quadratic", task_kwargs=dict(dim=4, num_functions=3),
                rule_kwargs=dict(layers=[5], preprocess=None, output_scale=0.1),
                num_steps=10, unroll=5, epochs=4, meta_lr=3e-3, eval_every=0, checkpoint_every=1)
    base.update(kw)
    return MetaConfig(**base)


def assert_same_rule(a, b):
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_previous_checkpoint_is_kept(tmp_path):
    MetaTrainer(small_config(epochs=3), tmp_path).run()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 3
    assert load_checkpoint(previous_path(tmp_path / "checkpoint.pt"))["epoch"] == 2
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing", "not_a_checkpoint"])
def test_damaged_checkpoint_is_a_clear_error_and_the_previous_one_resumes(tmp_path, damage):
    straight = MetaTrainer(small_config(), tmp_path / "a").run()
    out = tmp_path / "b"
    MetaTrainer(small_config(epochs=3), out).run()
    ck = out / "checkpoint.pt"
    data = ck.read_bytes()
    if damage == "truncated":
        ck.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        ck.write_bytes(data[:100] + b"\x00" * 50 + data[150:])
    elif damage == "empty":
        ck.write_bytes(b"")
    elif damage == "missing":
        ck.unlink()
    else:
        torch.save({"epoch": 3}, ck)
    with pytest.raises(CheckpointError) as e:
        MetaTrainer(small_config(), out, resume=True)
    msg = str(e.value)
    assert str(ck) in msg and "checkpoint.prev.pt (epoch 2) is intact" in msg and "mv " in msg, msg
    # nothing was deleted or changed by the refused resume
    assert (out / "log.jsonl").is_file() and previous_path(ck).is_file()
    # the CLI says the same, without a traceback
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(__import__("json").dumps(small_config().to_dict()))
    assert cli.main(["meta-train", "--config", str(cfg_file), "--out", str(out), "--resume"]) == 1
    # as the message says: the previous checkpoint resumes, exactly
    os.replace(previous_path(ck), ck)
    resumed = MetaTrainer(small_config(), out, resume=True).run()
    assert_same_rule(straight, resumed)


def test_both_damaged(tmp_path):
    MetaTrainer(small_config(epochs=2), tmp_path).run()
    for p in (tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"):
        p.write_bytes(p.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="cannot be read either"):
        MetaTrainer(small_config(), tmp_path, resume=True)


CHILD = textwrap.dedent("""
    import io, sys, time
    from pathlib import Path
    import torch
    from learnedopt.meta import MetaConfig, MetaTrainer
    from learnedopt.meta import checkpoints
    out, marker = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(int(sys.argv[3]))  # the parent's: the same reductions, the same bits
    real_save = torch.save
    calls = []

    def slow_save(obj, f):  # the third checkpoint's write stops half way, for the parent to kill us
        calls.append(1)
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            if len(calls) == 3:
                marker.write_text(str(f))
                time.sleep(120)
            fh.write(data[len(data) // 2:])

    checkpoints.torch.save = slow_save
    cfg = MetaConfig(**{CFG})
    MetaTrainer(cfg, out).run()
""")


def test_sigkill_during_a_checkpoint_write_leaves_a_usable_checkpoint(tmp_path):
    cfg = small_config(epochs=5)
    out, marker = tmp_path / "run", tmp_path / "writing"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")] + sys.path))
    child = subprocess.Popen([sys.executable, "-c", CHILD.replace("{CFG}", repr(cfg.to_dict())), str(out), str(marker),
                              str(torch.get_num_threads())],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if child.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the child never reached its third write: {child.communicate()[0].decode()}")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    half_written = Path(marker.read_text())
    assert half_written.is_file() and half_written.parent == out and half_written.name != "checkpoint.pt"
    # checkpoint.pt is the last complete one (epoch 2), the previous one too (epoch 1)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert load_checkpoint(previous_path(out / "checkpoint.pt"))["epoch"] == 1
    # resume (which clears the half-written temporary) gives the run never killed
    resumed = MetaTrainer(cfg, out, resume=True).run()
    assert not half_written.exists()
    straight = MetaTrainer(cfg, tmp_path / "straight").run()
    assert_same_rule(straight, resumed)


def test_fresh_run_clears_the_previous_checkpoint(tmp_path):
    MetaTrainer(small_config(epochs=2), tmp_path).run()
    assert previous_path(tmp_path / "checkpoint.pt").is_file()
    MetaTrainer(small_config(epochs=2), tmp_path)  # not resumed: nothing of the old run may pass for this one's
    assert not previous_path(tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "checkpoint.pt").is_file()
    assert meta.previous_path("x/checkpoint.pt") == Path("x/checkpoint.prev.pt")
