"""`localchat convert --to gptq` and the GPTQ backend, on the real starter checkpoint (CPU).

One quantization (about a minute on 2 cores) serves every test in the module: the
standard folder layout, transformers' own GPTQ loader, the runtime backend, `localchat
eval`, and GPTQ against plain round-to-nearest on text the calibration never saw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("gptqmodel")

from localchat.convert.gptq import (_scrub, calibration_batches, choose_group_size,  # noqa: E402
                                    quantize_gptq)
from localchat.store import Store  # noqa: E402

from .checkpoints import example_model, starter_hf, tiny_model  # noqa: E402

GREEDY = dict(temperature=0.0, max_tokens=24)


def test_group_size_falls_back_to_one_that_divides_the_layers() -> None:
    """The fallback stays within the group sizes vLLM's Marlin kernels read: never 16, and one
    group per output channel (-1) where no group size divides the widths."""
    assert choose_group_size({"a": 4096, "b": 11008}, 128) == (128, "")
    g, note = choose_group_size({"q": 576, "down": 1536}, 128)
    assert g == 64 and "does not divide the layer widths 576" in note and "using 64" in note
    assert choose_group_size({"x": 16 * 5}, 128)[0] == -1  # 16 divides 80, but Marlin refuses 16
    g, note = choose_group_size({"x": 100}, 128)
    assert g == -1 and "one group per output channel (-1)" in note


def test_local_paths_are_scrubbed_from_configs() -> None:
    cfg = {"quantization_config": {"bits": 4, "meta": {"offload_to_disk_path": "/tmp/gptqmodel_x",
                                                       "uri": "https://github.com/modelcloud/gptqmodel"}},
           "_name_or_path": "/home/me/models/secret", "note": "built in /srv/build-7/x"}
    out = _scrub(cfg, ("/srv/build-7",))
    assert out["quantization_config"]["meta"] == {"offload_to_disk_path": None,
                                                  "uri": "https://github.com/modelcloud/gptqmodel"}
    assert out["_name_or_path"] is None and out["note"] is None and out["quantization_config"]["bits"] == 4


@pytest.fixture(scope="module")
def source(starter_gguf: Path) -> Path:
    return starter_hf(starter_gguf)


@pytest.fixture(scope="module")
def gptq_home(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Store:
    """The starter checkpoint through `localchat convert --to gptq` into a fresh store."""
    from localchat.convert.command import main as convert_main

    root = tmp_path_factory.mktemp("gptq") / "home"
    old = os.environ.get("LOCALCHAT_HOME")
    os.environ["LOCALCHAT_HOME"] = str(root)
    try:
        assert convert_main([str(source), "--to", "gptq", "--name", "smol-gptq", "-q"]) == 0
    finally:
        if old is None:
            os.environ.pop("LOCALCHAT_HOME")
        else:
            os.environ["LOCALCHAT_HOME"] = old
    return Store(root)


@pytest.mark.slow
def test_output_is_a_standard_gptq_folder(gptq_home: Store, source: Path) -> None:
    e = gptq_home.get("smol-gptq")
    assert e.format == "gptq" and e.quant == "GPTQ-4bit-g64"  # 576-wide layers: 128 falls back to 64
    folder = gptq_home.path_of(e.files[0].path)
    qfile = json.loads((folder / "quantize_config.json").read_text())
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    for q in (qfile, qcfg):
        assert (q["bits"], q["group_size"], q["quant_method"], q["sym"], q["desc_act"]) == (4, 64, "gptq", True, False)
    for name in ("config.json", "quantize_config.json", "generation_config.json"):
        text = (folder / name).read_text()
        for local in ("/tmp", str(Path.home()), str(source), str(gptq_home.root)):
            assert local not in text, f"{name} leaks {local}"
    assert (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file()
    assert not list(gptq_home.root.glob(".smol-gptq.*")), "temp folder left behind"
    assert not (Path.cwd() / "logs").exists(), "GPTQModel's log files must not land in the user's folder"
    assert {"ppl", "kld", "top1"} <= set(e.eval)


NEAR_TIE = 0.05  # logits closer than this may swap under float rounding (kernels, batch shapes, threads)


@pytest.mark.slow
def test_transformers_loads_it_back_and_answers(gptq_home: Store) -> None:
    """transformers reads the folder (its own GPTQ path, the checkpoint's dtype) and agrees with
    float32 by KL; localchat's GPTQ backend answers greedily what transformers' generate answers
    in the same dtype, token for token up to the first near-tie of the logits (not by exact text:
    which side of a tie wins depends on the machine and the package versions)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localchat.chat import ChatSession
    from localchat.engine import SamplingSettings
    from localchat.planner import Overrides
    from localchat.runtime import open_model

    folder = gptq_home.path_of(gptq_home.get("smol-gptq").files[0].path)
    tok = AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n_prompt = ids["input_ids"].shape[1]

    native = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")  # transformers' GPTQ path
    assert "quantization_config" in native.config.to_dict()
    q_proj = native.model.layers[0].self_attn.q_proj
    assert hasattr(q_proj, "qweight") and not isinstance(q_proj, torch.nn.Linear)
    with torch.inference_mode():
        native_logits = native(**ids).logits[0, -1].float()
    del native

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    with torch.inference_mode():
        f32_logits = model(**ids).logits[0, -1]
        kl = F.kl_div(F.log_softmax(native_logits, -1), F.log_softmax(f32_logits, -1), log_target=True,
                      reduction="sum").item()
        assert kl < 0.02 and native_logits.argmax() == f32_logits.argmax(), kl
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    theirs = [t for t in out[0][n_prompt:].tolist() if t != tok.eos_token_id]
    assert len(tok.decode(theirs, skip_special_tokens=True).split()) >= 3

    loaded = open_model("smol-gptq", Overrides(context=1024), gptq_home)
    try:
        ours = ChatSession(loaded.backend, system="You are a helpful assistant.").ask(
            "What is the capital of France?", SamplingSettings(temperature=0.0, max_tokens=24, repeat_penalty=1.0))
    finally:
        loaded.backend.close()
    mine = tok(ours.strip(), add_special_tokens=False)["input_ids"]
    k = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
    if k is None:  # one is a prefix of the other: only the 24-token budget may cut either
        assert mine[:len(theirs)] == theirs[:len(mine)] and min(len(mine), len(theirs)) >= 3, (ours, theirs)
        return
    assert k >= 3, (ours, tok.decode(theirs))  # the answer starts the same
    with torch.inference_mode():
        prefix = torch.tensor([ids["input_ids"][0].tolist() + theirs[:k]])
        logits = model(input_ids=prefix).logits[0, -1]
    gap = abs(float(logits[theirs[k]] - logits[mine[k]]))
    assert gap < NEAR_TIE, (f"the answers part at token {k} where the logits differ by {gap:.3f}, not a tie",
                            ours, tok.decode(theirs))


@pytest.mark.slow
def test_runtime_runs_gptq_on_the_cpu_and_says_why(gptq_home: Store) -> None:
    from localchat.chat import ChatSession
    from localchat.engine import SamplingSettings
    from localchat.planner import Overrides
    from localchat.runtime import open_model

    loaded = open_model("smol-gptq", Overrides(context=1024), gptq_home)
    try:
        assert loaded.plan.backend == "gptq-cpu"
        assert any("runs on the CPU through torch" in r for r in loaded.plan.reasons)
        session = ChatSession(loaded.backend, system="You are a helpful assistant.")
        chunks = list(session.send("Tell me about the city of Paris.", SamplingSettings(**GREEDY)))
        answer = "".join(c.text for c in chunks)
        assert len(chunks) > 3 and "<|im_end|>" not in answer and answer == answer.lstrip()
        stats = chunks[-1].stats
        assert stats.completion_tokens > 3 and stats.decode_tok_s > 0 and stats.ttft_s > 0
        # a stop string taken from the middle of that answer cuts it exactly there
        words = answer.split()
        stop = " " + words[len(words) // 2]
        cut = "".join(c.text for c in session.stream_reply(session.messages[:-1], SamplingSettings(
            **GREEDY, stop=(stop,))))
        assert cut == answer[:answer.index(stop)] and session.last_stats.finish_reason == "stop"
    finally:
        loaded.backend.close()


@pytest.mark.slow
def test_eval_command_scores_gptq_against_its_source(gptq_home: Store, source: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    from localchat.commands.eval import main as eval_main

    folder = gptq_home.path_of(gptq_home.get("smol-gptq").files[0].path)
    text = Path(__file__).with_name("data_eval_prose.txt")
    assert eval_main([str(folder), "--base", str(source), "--text", str(text)]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "KL divergence" in out


@pytest.mark.slow
def test_gptq_beats_round_to_nearest_on_unseen_text(gptq_home: Store, source: Path) -> None:
    """The point of GPTQ: at the same bits and group size, lower perplexity than plain rounding."""
    from localchat.convert.rtn import rtn_quantize_
    from localchat.engine.gptq import load_model
    from localchat.evaluation import evaluate_runs, torch_token_logprobs

    folder = gptq_home.path_of(gptq_home.get("smol-gptq").files[0].path)
    text = Path(__file__).with_name("data_eval_prose.txt").read_text(encoding="utf-8")
    fp, tok = load_model(source, "cpu")
    rtn, _ = load_model(source, "cpu")
    rtn_quantize_(rtn, 4, 64)
    gq, _ = load_model(folder, "cpu")

    def run(m):  # noqa: ANN001
        return lambda: torch_token_logprobs(m, tok, text, 256)

    ev_rtn, ev_gq = evaluate_runs(run(rtn), run(fp)), evaluate_runs(run(gq), run(fp))
    print(f"\nppl fp {ev_rtn.ppl_base:.3f}, RTN {ev_rtn.ppl:.3f}, GPTQ {ev_gq.ppl:.3f}; "
          f"KLD RTN {ev_rtn.kld:.4f}, GPTQ {ev_gq.kld:.4f}")
    assert ev_gq.ppl < ev_rtn.ppl
    assert ev_gq.kld < ev_rtn.kld


@pytest.mark.slow
def test_rlhf_value_head_checkpoint_quantizes(tmp_path: Path, source: Path) -> None:
    """TRL PPO layout (v_head tensors beside the model's): the shared loader drops the head."""
    import torch
    from safetensors.torch import load_file, save_file

    src = tiny_model("LlamaForCausalLM", tmp_path / "trl", source)
    state = load_file(str(src / "model.safetensors"))
    save_file({**state, "v_head.summary.weight": torch.randn(1, 64), "v_head.summary.bias": torch.zeros(1)},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    r = quantize_gptq(src, tmp_path / "out", group_size=32, samples=8, quiet=True)
    assert any("value head" in line for line in r.report) and not r.plain_source
    assert r.group_size == 32 and (tmp_path / "out" / "quantize_config.json").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("v_head") for k in keys) and any(k.endswith("qweight") for k in keys)


def test_calibration_rows_are_full_windows(source: Path) -> None:
    from transformers import AutoTokenizer

    from localchat.convert.gptq import calibration_texts

    tok = AutoTokenizer.from_pretrained(source)
    texts = calibration_texts(tok)
    assert any("<|im_start|>assistant" in t for t in texts), "chats are rendered with the model's template"
    assert any("<|im_start|>" not in t for t in texts), "plain prose is mixed in"
    rows = calibration_batches(tok, texts, 256, 1000)
    assert len(rows) >= 8 and all(len(r["input_ids"]) == 256 for r in rows[:-1])


@pytest.mark.slow
def test_bench_times_both_backends_and_the_planner_ranks_by_it(gptq_home: Store, starter_gguf: Path) -> None:
    """A model with a GGUF and a GPTQ folder: `localchat bench` times llama.cpp and the GPTQ
    backend for real, and the plan names both figures and picks the faster."""
    from localchat.commands.bench import bench
    from localchat.runtime import plan_model
    from localchat.store import ModelEntry, ModelFile

    from .conftest import link_or_copy

    gptq = gptq_home.get("smol-gptq").files[0]
    gguf = gptq_home.model_dir("both") / starter_gguf.name
    gguf.parent.mkdir(parents=True, exist_ok=True)
    link_or_copy(starter_gguf, gguf)
    gptq_home.add(ModelEntry(name="both", format="gguf", quant="Q4_1", source="test", files=[
        ModelFile(str(gguf.relative_to(gptq_home.root)), gguf.stat().st_size, ""), gptq]))
    run = bench("both", gptq_home, tokens=16)
    assert not run.failures, run.failures
    rows = {r.measured.backend: r.measured for r in run.rows}
    assert set(rows) == {"llamacpp-cpu", "gptq-cpu"}
    assert all(m.decode_tok_s > 0 for m in rows.values())
    assert rows["llamacpp-cpu"].decode_tok_s > rows["gptq-cpu"].decode_tok_s  # what the default order assumes
    _, p = plan_model("both", store=gptq_home)
    assert p.backend == "llamacpp-cpu"
    why = next(r for r in p.reasons if r.startswith("measured decode speed"))
    assert why.index("llamacpp-cpu") < why.index("gptq-cpu") and why.endswith("llamacpp-cpu first"), why


@pytest.mark.slow
def test_gptq_beside_a_gguf_makes_one_model_with_both(tmp_path: Path, source: Path) -> None:
    """`convert --to gptq --name M` for a GGUF model M: one model, two artifacts; a later GGUF
    export of M (with replace) keeps the GPTQ folder and deletes the GGUF it replaces."""
    from localchat.convert.command import export_gguf, export_gptq
    from localchat.store.resolve import resolve_model

    store = Store(tmp_path / "home")
    src = tiny_model("LlamaForCausalLM", tmp_path / "tiny", source)
    export_gguf(src, "Q8_0", name="tiny", store=store, check=False, quiet=True)
    r = export_gptq(src, name="tiny", group_size=32, store=store, quiet=True, mse=0.0)
    assert any("added beside tiny's GGUF" in line for line in r.report)
    assert "smoke chat" in " ".join(r.report)  # the smoke chat ran on the GPTQ backend
    e = store.get("tiny")
    assert e.format == "gguf" and e.quant == "Q8_0 + GPTQ-4bit-g32" and "gptq_eval" in e.extra
    assert {a.format for a in resolve_model("tiny", store).artifacts} == {"gguf", "gptq"}
    assert (store.model_dir("tiny") / "tiny-Q8_0.gguf").is_file()  # the GGUF survived the GPTQ write
    export_gguf(src, "Q4_0", name="tiny", store=store, check=False, quiet=True, replace=True)
    e = store.get("tiny")
    assert e.quant == "Q4_0 + GPTQ-4bit-g32"
    # Q4_0 is importance-weighted: its matrix is kept beside the model for the next quantization.
    assert sorted(p.name for p in store.model_dir("tiny").iterdir()) == ["gptq", "tiny-Q4_0.gguf",
                                                                         "tiny.imatrix.gguf"]
    assert {a.format for a in resolve_model("tiny", store).artifacts} == {"gguf", "gptq"}


# Tiny random models of today's families (tests.checkpoints.FAMILY_EXAMPLES) through `--to gptq`: Qwen3 (q/k
# norms, head_dim beyond hidden/heads, tied embeddings, Qwen's BPE) and Llama 3.2 (Llama 3's BPE, llama3 rope
# scaling, tied embeddings).
GPTQ_FAMILIES = [("Qwen3ForCausalLM", "qwen3"), ("LlamaForCausalLM", "llama3.2")]
# 4-bit weights move these models' next-token distributions by a mean KL of 0.004-0.01 per position; the
# same family with other random weights is far beyond this (the test measures that too).
GPTQ_KL = 0.05
GPTQ_TEXT = ("def add(a, b):\n    return a + b  # 1234567\n"
             "  The quick brown fox, 🦙 and 日本語, jumps over 3 lazy dogs.")


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "variant"), GPTQ_FAMILIES, ids=[v for _, v in GPTQ_FAMILIES])
def test_convert_to_gptq_on_todays_families(arch: str, variant: str, source: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`localchat convert PATH --to gptq` on a tiny Qwen3 / Llama 3.2 model: the store holds a 4-bit GPTQ model
    (group size 128 falling back to 64 for 64-wide layers) with the check `convert` ran; the runtime plans it
    on the GPTQ backend, whose loader gives next-token distributions within KL 0.05 of the float32 source's on a
    chat prompt (a model of other random weights is 5x further), and a greedy chat through it answers, in the
    model's template, exactly what transformers' generate answers from the same folder and prompt ids."""
    import torch
    import torch.nn.functional as F
    import transformers

    from localchat.chat import ChatSession
    from localchat.convert.command import main as convert_main
    from localchat.engine import SamplingSettings
    from localchat.engine.gptq import load_model
    from localchat.planner import Overrides
    from localchat.runtime import open_model
    from localchat.templates import get_format

    src = example_model(arch, variant, tmp_path / variant, source)
    if transformers.AutoTokenizer.from_pretrained(src).chat_template is None:
        # Instruct models ship their template; the Llama 3 vocabulary rebuilt from llama.cpp's file has none.
        (src / "chat_template.jinja").write_text(get_format("llama-3").template, encoding="utf-8")
    home = Store(tmp_path / "home")
    monkeypatch.setenv("LOCALCHAT_HOME", str(home.root))
    assert convert_main([str(src), "--to", "gptq", "--name", variant, "-q"]) == 0
    e = home.get(variant)
    assert e.format == "gptq" and e.quant == "GPTQ-4bit-g64" and e.eval["kld"] < GPTQ_KL, (e.quant, e.eval)
    folder = home.path_of(e.files[0].path)

    loaded = open_model(variant, Overrides(context=1024), home)
    try:
        assert loaded.plan.backend == "gptq-cpu"
        session = ChatSession(loaded.backend, system="You are a helpful assistant.")
        ids = torch.tensor([loaded.backend.tokenize(session.render(
            session.messages + [{"role": "user", "content": GPTQ_TEXT}]))])
        quantized, _ = load_model(folder, "cpu")
        other = example_model(arch, variant, tmp_path / "other", source, seed=1)
        with torch.inference_mode():
            want = F.log_softmax(transformers.AutoModelForCausalLM.from_pretrained(
                src, dtype=torch.float32).eval()(ids).logits[0].float(), -1)

            def kl(model: torch.nn.Module) -> torch.Tensor:  # per position, KL(source || model)
                return F.kl_div(F.log_softmax(model(ids).logits[0].float(), -1), want, log_target=True,
                                reduction="none").sum(-1)

            near, far = kl(quantized), kl(transformers.AutoModelForCausalLM.from_pretrained(
                other, dtype=torch.float32).eval())
        assert near.mean() < GPTQ_KL and near.max() < 2 * GPTQ_KL, (near.mean(), near.max())
        assert far.mean() > 5 * GPTQ_KL, far.mean()

        question = "What is the capital of France?"
        prompt = loaded.backend.tokenize(session.render(session.messages + [{"role": "user", "content": question}]))
        chunks = list(session.send(question, SamplingSettings(temperature=0.0, max_tokens=16, repeat_penalty=1.0)))
    finally:
        loaded.backend.close()
    answer = "".join(c.text for c in chunks)
    with torch.inference_mode():
        out = quantized.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    theirs = tok.decode([t for t in out.tolist() if t != tok.eos_token_id], skip_special_tokens=False)
    assert answer and answer == theirs.lstrip(), (answer, theirs)  # the chat lstrips its first words
    assert chunks[-1].stats.completion_tokens == len(out) and chunks[-1].stats.finish_reason == "length"
