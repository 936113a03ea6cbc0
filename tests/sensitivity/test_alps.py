import pytest

import lowbit.sensitivity.alps as alps_module
from lowbit.errors import LowbitError
from lowbit.io import load_json
from lowbit.sensitivity import alps_fit_config, alps_scores, load_w4a4_run
from lowbit.train import evaluate

CANDS = ["layer1.0.conv1", "layer2.0.conv2", "layer3.0.conv2"]


def _fit(**kw):
    return alps_fit_config(0.25, batch_size=32, **kw)  # a quarter epoch of 256 examples: 2 steps per job


def _counting(monkeypatch):
    calls = []
    real = alps_module.finetune_dropped

    def counted(job, names):
        calls.append(tuple(names))
        return real(job, names)

    monkeypatch.setattr(alps_module, "finetune_dropped", counted)
    return calls


def test_scores_are_drops_from_the_finetuned_reference(w4a4, tmp_path):
    run, data = w4a4
    model, _ = load_w4a4_run(run)
    t = alps_scores(model, data, CANDS, fit=_fit(), out=tmp_path)
    ref = load_json(tmp_path / "alps" / "_reference.json")
    assert t.config["reference_val_acc"] == ref["val_acc"] and ref["layer"] is None
    for r in t.rows:
        saved = load_json(tmp_path / "alps" / f"{r.layer}.json")
        assert r.score == pytest.approx(ref["val_acc"] - saved["val_acc"]) and r.extra["val_acc"] == saved["val_acc"]
    assert t.layers == CANDS and all(r.macs > 0 for r in t.rows)
    # 4 jobs (3 candidates + reference), each 2 training steps of 32 = a quarter of the 256 training examples
    assert t.passes["backward"] == 8 and t.passes["epochs"] == pytest.approx(1.0) and t.passes["hvp"] == 0
    assert t.passes["forward"] > t.passes["backward"]  # calibration and validation passes too
    assert t.config["resumed"] == 0


def test_resume_never_redoes_a_finished_candidate(w4a4, tmp_path, monkeypatch):
    run, data = w4a4
    model, _ = load_w4a4_run(run)
    first = alps_scores(model, data, CANDS, fit=_fit(), out=tmp_path)
    folder = tmp_path / "alps"
    (folder / f"{CANDS[1]}.json").unlink()  # as if the run had been killed before this candidate finished
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.json")}
    calls = _counting(monkeypatch)
    again = alps_scores(model, data, CANDS, fit=_fit(), out=tmp_path, resume=True)
    assert calls == [(CANDS[1],)]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.json")
            if p.name in stamps} == stamps  # finished files untouched
    assert again.scores == first.scores  # the redone job is deterministic
    assert again.config["resumed"] == 3
    calls.clear()
    alps_scores(model, data, CANDS, fit=_fit(), out=tmp_path, resume=True)
    assert calls == []


def test_resume_refuses_files_made_with_other_settings(w4a4, tmp_path):
    run, data = w4a4
    model, _ = load_w4a4_run(run)
    alps_scores(model, data, CANDS[:1], fit=_fit(), out=tmp_path, reference="checkpoint")
    with pytest.raises(LowbitError, match="other settings"):
        alps_scores(model, data, CANDS[:1], fit=_fit(lr=0.5), out=tmp_path, resume=True, reference="checkpoint")


def test_checkpoint_reference_needs_no_extra_job(w4a4, monkeypatch):
    run, data = w4a4
    model, _ = load_w4a4_run(run)
    calls = _counting(monkeypatch)
    t = alps_scores(model, data, CANDS[:1], fit=_fit(), reference="checkpoint")
    assert calls == [(CANDS[0],)]
    assert t.config["reference_val_acc"] == evaluate(model, data.val)[1]
    with pytest.raises(LowbitError, match="reference"):
        alps_scores(model, data, CANDS[:1], fit=_fit(), reference="best")


def test_parallel_workers_write_each_candidate(w4a4, tmp_path):
    run, data = w4a4
    model, _ = load_w4a4_run(run)
    serial = alps_scores(model, data, CANDS[:2], fit=_fit(), reference="checkpoint")
    parallel = alps_scores(model, data, CANDS[:2], fit=_fit(), reference="checkpoint", workers=2, out=tmp_path)
    assert sorted(p.name for p in (tmp_path / "alps").glob("*.json")) == sorted(f"{c}.json" for c in CANDS[:2])
    assert parallel.scores == pytest.approx(serial.scores, abs=1.5 / len(data.val))
    assert parallel.config["workers"] == 2
