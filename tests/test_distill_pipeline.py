"""Distillation pipeline (distill/): the top-k teacher cache (round trip, shard-level resume, spec refusal), the
vocabulary check, the trainer (online / offline / on-policy paths, exact resume, torchrun data parallelism) and
sequence-level KD filtering. Tiny random-weight models: nothing here needs learning.

Run: PYTHONPATH=. python -m pytest -q tests/test_distill_pipeline.py
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from distill.cache_teacher import TopKCache, build_cache, bytes_per_token
from distill.data import load_examples
from distill.teacher import VocabMismatch, check_vocab, side
from distill.train import main as distill_main
from model import Transformer, load_model, preset, save_model
from train.corpus import build_tokenizer, problems
from train.data import DataError
from train.sft import encode_pairs, read_pairs
from tests.test_pretrain import _metrics
from tests.tiny_checkpoint import save_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT = ["--student.hidden_size", "32", "--student.intermediate_size", "64", "--student.num_hidden_layers", "1",
           "--training.micro_batch", "4", "--training.threads", "1", "--metrics.progress", "false",
           "--metrics.eval_every", "0", "--metrics.eval_problems", "2", "--metrics.eval_rows", "4",
           "--data.num_problems", "40", "--distill.max_new_tokens", "12", "--optimizer.warmup_steps", "2"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("teacher") / "final")


# ------------------------------------------------------------------------------------------------ the cache

def test_cache_holds_the_teachers_topk_and_resumes_by_shard(teacher_dir, tmp_path):
    out = str(tmp_path / "cache")
    logs = []
    manifest = build_cache(teacher_dir, "builtin", out, 4, num_problems=20, rows_per_shard=8, log=logs.append)
    assert manifest["bytes_per_token"] == bytes_per_token(4) == 24 and len(manifest["shards"]) == 3
    teacher = load_model(teacher_dir).eval()
    tok = build_tokenizer()
    examples = load_examples("builtin", tok, seed=0, num_problems=20, template="arithmetic", seq_len=256)
    cache = TopKCache(out)
    assert cache.num_rows == 20 and cache.top_k == 4
    rows = list(cache.rows())
    for (ids, labels, t_ids, t_lp), (e_ids, e_labels) in zip(rows, examples):
        assert ids.tolist() == e_ids and labels.tolist() == e_labels
        assert t_ids.dtype == torch.int32 and t_lp.dtype == torch.float16
        with torch.no_grad():
            logp = teacher(torch.tensor([e_ids])).logits[0, :-1].float().log_softmax(-1)
        pos = [p for p in range(len(e_ids) - 1) if e_labels[p + 1] != -100]
        ref = logp[pos].topk(4)
        assert torch.equal(t_ids.long(), ref.indices)
        assert torch.allclose(t_lp.float(), ref.values, atol=1e-3, rtol=1e-3)  # fp16 storage
    # a batch puts each row's top-k at its scored positions
    batch = cache.batch_of(rows[:2], pad=1)
    scored = batch["labels"][:, 1:] != -100
    assert torch.equal(batch["topk"].ids[0][scored[0]], rows[0][2].long())

    # shard-level resume: a missing and a corrupt shard are redone, the good one is skipped
    os.remove(os.path.join(out, "shard_00001.safetensors"))
    with open(os.path.join(out, "shard_00002.safetensors"), "r+b") as f:
        f.seek(60)
        f.write(b"\xff\xff\xff")
    good = os.path.getmtime(os.path.join(out, "shard_00000.safetensors"))
    logs.clear()
    build_cache(teacher_dir, "builtin", out, 4, num_problems=20, rows_per_shard=8, log=logs.append)
    assert "2 shards written, 1 already done" in logs[-1]
    assert os.path.getmtime(os.path.join(out, "shard_00000.safetensors")) == good
    assert [r[3].tolist() for r in TopKCache(out).rows()] == [r[3].tolist() for r in rows]
    with pytest.raises(DataError, match="different settings.*top_k"):
        build_cache(teacher_dir, "builtin", out, 5, num_problems=20, rows_per_shard=8, log=logs.append)


def test_builtin_rows_are_the_pretraining_corpus_documents(tmp_path):
    from train.corpus import BuiltinCorpus

    corpus = BuiltinCorpus(seed=3, num_problems=50, flawed_fraction=0.6, work_dir=str(tmp_path))
    rows = load_examples("builtin", corpus.tokenizer, seed=3, num_problems=50, template="arithmetic", seq_len=256,
                         flawed_fraction=0.6)
    assert [t for ids, _ in rows for t in ids] == corpus.train_tokens().tolist()  # same sloppy draws, same tokens
    clean = load_examples("builtin", corpus.tokenizer, seed=3, num_problems=50, template="arithmetic", seq_len=256)
    assert sum(a != b for a, b in zip(rows, clean)) > 10


# ------------------------------------------------------------------------------------------------ vocabulary

def _swapped_tokenizer(path):
    tok = json.loads(open(os.path.join(path, "tokenizer.json")).read())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    return json.dumps(tok)


def test_vocabulary_mismatch_is_refused(teacher_dir, tmp_path, capsys):
    tok_path = os.path.join(teacher_dir, "tokenizer.json")
    check_vocab(side(102, tok_path), side(102, tok_path))
    reformatted = tmp_path / "same_vocab.json"
    reformatted.write_text(json.dumps(json.loads(open(tok_path).read())))  # other bytes, same token -> id map
    check_vocab(side(102, tok_path), side(102, str(reformatted)))
    with pytest.raises(VocabMismatch, match="vocab_size 102 but student has 128"):
        check_vocab(side(102, tok_path), side(128, tok_path))
    swapped = tmp_path / "swapped.json"
    swapped.write_text(_swapped_tokenizer(teacher_dir))
    with pytest.raises(VocabMismatch, match=r"tokenizers differ.*first differing ids: \d+: 'a' vs 'b'"):
        check_vocab(side(102, tok_path), side(102, str(swapped)))
    # the trainer refuses a student checkpoint whose tokenizer differs, before training anything
    student = tmp_path / "student"
    save_model(Transformer(preset("tiny", vocab_size=102)), student)
    (student / "tokenizer.json").write_text(_swapped_tokenizer(teacher_dir))
    run = str(tmp_path / "run")
    assert distill_main(STUDENT + ["--teacher.path", teacher_dir, "--student.init_from", str(student),
                                   "--run-dir", run, "--training.steps", "1"]) == 1
    assert "tokenizers differ" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))


# ------------------------------------------------------------------------------------------------ the trainer

def test_resume_is_bit_identical_with_on_policy_batches(teacher_dir, tmp_path):
    args = STUDENT + ["--teacher.path", teacher_dir, "--distill.lmbda", "0.5", "--training.steps", "6",
                      "--training.grad_accum", "2", "--checkpoint.every", "3", "--seed", "1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert distill_main(args + ["--run-dir", full]) == 0
    assert distill_main(args + ["--run-dir", cut]) == 0
    rows = _metrics(full)
    assert 0 < sum(r["onpolicy_fraction"] for r in rows) < len(rows)  # both kinds of micro-batch happened
    shutil.rmtree(os.path.join(cut, "checkpoints", "step_00000006"))
    shutil.rmtree(os.path.join(cut, "final"))
    assert distill_main(args + ["--run-dir", cut, "--resume", "auto"]) == 0
    a = load_file(os.path.join(full, "final", "model.safetensors"))
    b = load_file(os.path.join(cut, "final", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(cut)] == [r["loss"] for r in rows]
    assert [r["step"] for r in _metrics(cut)] == list(range(1, 7))


def test_on_policy_batches_are_student_samples_scored_by_the_teacher(teacher_dir, tmp_path):
    run = str(tmp_path / "onpolicy")
    assert distill_main(STUDENT + ["--teacher.path", teacher_dir, "--distill.lmbda", "1.0", "--training.steps", "2",
                                   "--distill.divergence", "jsd", "--distill.beta", "0.5", "--run-dir", run,
                                   "--checkpoint.every", "0"]) == 0
    rows = _metrics(run)
    for r in rows:
        assert r["onpolicy_fraction"] == 1.0 and r["onpolicy_tokens"] > 0
        assert "ce_loss" not in r and 0 < r["kd_loss"] < float("inf") and r["grad_norm"] > 0
    assert "accuracy" in rows[-1] and "val_top1_agreement" in rows[-1]


def test_offline_cache_run_and_ce_only_baseline_share_rows(teacher_dir, tmp_path):
    cache = str(tmp_path / "cache")
    build_cache(teacher_dir, "builtin", cache, 4, num_problems=40, rows_per_shard=16, log=lambda m: None)
    kd, ce = str(tmp_path / "kd"), str(tmp_path / "ce")
    common = STUDENT + ["--teacher.mode", "offline", "--teacher.cache", cache, "--training.steps", "3",
                        "--checkpoint.every", "0"]
    assert distill_main(common + ["--run-dir", kd]) == 0
    assert distill_main(common + ["--run-dir", ce, "--distill.alpha", "1.0"]) == 0
    rk, rc = _metrics(kd), _metrics(ce)
    assert [r["tokens"] for r in rk] == [r["tokens"] for r in rc]  # the same rows, step by step
    assert rk[0]["loss"] != rc[0]["loss"] and "kd_loss" in rk[0] and "top1_agreement" in rk[0]
    assert os.path.isfile(os.path.join(kd, "final", "tokenizer.json"))
    from tools.plot import plot_run

    assert "loss.png" in {os.path.basename(p) for p in plot_run(kd)}


@pytest.mark.distributed
def test_torchrun_two_processes_match_one_process(teacher_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    common = STUDENT + ["--teacher.path", teacher_dir, "--training.steps", "2", "--checkpoint.every", "0",
                        "--training.micro_batch", "2", "--metrics.eval_problems", "0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, "-m", "distill.train", *common, "--training.grad_accum", "2", "--run-dir", one],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "distill.train", *common, "--run-dir", two],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    l1, l2 = [r["loss"] for r in _metrics(one)], [r["loss"] for r in _metrics(two)]
    assert len(l1) == len(l2) == 2 and max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5
    a = load_file(os.path.join(one, "final", "model.safetensors"))
    b = load_file(os.path.join(two, "final", "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


# ------------------------------------------------------------------------------------------------ seqkd

def test_seqkd_keeps_only_correct_well_formatted_unique_samples(teacher_dir, tmp_path):
    from distill import seqkd

    def fake_sampler(teacher, tokenizer, plist, k, **_):
        out = []
        for p in plist:
            good = p.solution()[len("<think>"):]
            out.append([good, good,  # a duplicate
                        good.replace(f"<answer>{p.answer}</answer>", f"<answer>{p.answer + 1}</answer>"),  # wrong
                        good.replace("</think>", ""),  # correct answer, malformed
                        f"<answer>{p.answer}</answer>"][:k])  # no </think>: malformed after the prefilled <think>
        return out

    out = str(tmp_path / "pairs.jsonl")
    stats = seqkd.run(teacher_dir, out, 5, num_prompts=6, sampler=fake_sampler, log=lambda m: None)
    assert stats["samples"] == 30 and stats["kept"] == 12 and stats["written"] == 6
    rows = [json.loads(line) for line in open(out)]
    plist = problems(0, 6, held_out=False)
    assert [(r["prompt"], r["response"]) for r in rows] == [(p.question, p.solution()[7:]) for p in plist]
    # train.sft reads it, and the arithmetic template rebuilds the corpus document the teacher completed
    tok = build_tokenizer()
    [(ids, _)] = encode_pairs(read_pairs(out)[:1], tok, "arithmetic", seq_len=256)
    doc = f"{plist[0].question}\n{plist[0].solution()}<|endoftext|>"
    assert ids == tok.encode(doc).ids
    # filter "none" keeps every distinct completion (the duplicate once), correct or not
    stats = seqkd.run(teacher_dir, out, 5, num_prompts=6, sampler=fake_sampler, filter="none", log=lambda m: None)
    assert stats["kept"] == 12 and stats["written"] == 6 * 4 and len(open(out).read().splitlines()) == 24
    with pytest.raises(ValueError, match="filter"):
        seqkd.run(teacher_dir, out, 1, num_prompts=1, sampler=fake_sampler, filter="best", log=lambda m: None)
    # the real sampler runs end to end with a random teacher (which solves nothing)
    stats = seqkd.run(teacher_dir, out, 1, num_prompts=2, max_new_tokens=8, log=lambda m: None)
    assert stats["samples"] == 2 and stats["written"] == len(open(out).read().splitlines())


# ------------------------------------------------------------------------------------------------ pruned student

def test_pruned_student_is_cut_from_the_teacher(teacher_dir, tmp_path):
    from distill.prune import expert_usage, prune_teacher

    teacher = load_model(teacher_dir).eval()
    ids = torch.randint(0, 102, (2, 10))
    with torch.no_grad():
        same = prune_teacher(teacher, [0, 1], 0).eval()  # every block and expert: the teacher without its MTP
        assert torch.equal(same(ids).logits, teacher(ids).logits)
        usage = expert_usage(teacher, [ids])
        assert usage[1].sum() == 2 * 10 * teacher.config.num_experts_per_tok
        usage = {1: torch.tensor([0.0, 5, 1, 9, 0, 0, 3, 2])}
        small = prune_teacher(teacher, [0, 1], 2, usage)
    moe_t, moe_s = teacher.layers[1].mlp, small.layers[1].mlp
    assert small.config.n_routed_experts == 2 and small.config.num_experts_per_tok == 2
    assert torch.equal(moe_s.experts.gate_up_proj, moe_t.experts.gate_up_proj[[1, 3]])
    assert torch.equal(moe_s.gate.weight, moe_t.gate.weight[[1, 3]])
    dense_t = teacher.layers[0].state_dict()
    assert all(torch.equal(v, dense_t[k]) for k, v in small.layers[0].state_dict().items())  # copied whole
    with pytest.raises(ValueError, match="keep_layers"):
        prune_teacher(teacher, [1, 0], 0)
    one = prune_teacher(teacher, [0, 1], 1, usage)  # one expert: always chosen (greedy top-1 of 1)
    assert one.config.n_routed_experts == 1 and one.config.topk_method == "greedy"
    assert torch.equal(one.layers[1].mlp.experts.gate_up_proj, moe_t.experts.gate_up_proj[[3]])
    assert one(ids).logits.shape == teacher(ids).logits.shape
    run = str(tmp_path / "pruned")
    assert distill_main(STUDENT + ["--teacher.path", teacher_dir, "--student.init", "prune", "--student.keep_layers",
                                   "1", "--student.keep_experts", "4", "--training.steps", "1",
                                   "--checkpoint.every", "0", "--run-dir", run]) == 0
    assert load_model(os.path.join(run, "final")).config.n_routed_experts == 4


def test_demo_stage_returns_the_four_accuracies(teacher_dir, tmp_path):
    from distill.demo import DemoSettings, run_distillation_stage

    s = DemoSettings(eval_problems=2, keep_layers=(0, 1), keep_experts=2, max_new_tokens=8, micro_batch=4,
                     warmup_steps=1, teacher_filter="none")  # a random teacher solves nothing: keep its rows all
    out = run_distillation_stage(teacher_dir, str(tmp_path / "demo"), seed=0, budget=2, settings=s, log=lambda m: None)
    for key in ("accuracy_teacher", "accuracy_student_ce", "accuracy_student_seqkd", "accuracy_student_kd",
                "accuracy_student_onpolicy"):
        assert 0.0 <= out[key] <= 1.0
    assert out["cache_bytes_per_token"] == 8 * 6 and out["cache_tokens"] > 0
    assert out["tokens_seen_seqkd"] == out["tokens_seen_kd"]  # the same cached rows
    assert isinstance(out["target_met"], bool) and out["teacher_rows"]["samples"] == 2 * 4
    assert json.load(open(tmp_path / "demo" / "summary.json"))["budget_steps"] == 2
    # the KD rows are the teacher's own completions (prompt + completion + EOS), not the corpus rows
    tok = build_tokenizer()
    pairs = read_pairs(str(tmp_path / "demo" / "teacher_rows.jsonl"))
    cached = [r[0].tolist() for r in TopKCache(str(tmp_path / "demo" / "cache")).rows()]
    assert cached == [ids for ids, _ in encode_pairs(pairs, tok, "arithmetic", seq_len=256)]


def test_demo_refuses_when_no_teacher_row_passes_the_filter(teacher_dir, tmp_path):
    from distill.demo import DemoSettings, run_distillation_stage

    s = DemoSettings(eval_problems=2, keep_layers=(0, 1), keep_experts=2, max_new_tokens=8, micro_batch=2)
    with pytest.raises(ValueError, match="passed the 'correct' filter"):
        run_distillation_stage(teacher_dir, str(tmp_path / "demo"), seed=0, budget=1, settings=s, log=lambda m: None)


def test_target_is_ninety_percent_of_the_teacher_and_above_ce():
    from distill.demo import target_met

    assert target_met(0.68, kd=0.62, ce=0.30)
    assert not target_met(0.68, kd=0.61, ce=0.30)  # 0.61 < 0.9 x 0.68 = 0.612
    assert not target_met(0.68, kd=0.65, ce=0.65)  # not strictly above CE
