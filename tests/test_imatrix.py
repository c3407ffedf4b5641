"""Importance-weighted GGUF quantization (convert/imatrix.py, issue 18): the matrix from chat
calibration in torch, llama.cpp's file format, llama.cpp's quantizer weighted by it, and
`localchat convert`'s --no-imatrix / --calibration and the types that need one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")

import gguf  # noqa: E402

from localchat.cli import main as cli  # noqa: E402
from localchat.convert.checkpoint import load_checkpoint  # noqa: E402
from localchat.convert.imatrix import imatrix_for  # noqa: E402
from localchat.convert.quantize import quantize  # noqa: E402
from localchat.convert.to_gguf import plan_gguf, write_gguf  # noqa: E402
from localchat.evaluation import evaluate  # noqa: E402
from localchat.gguf_file import read_gguf  # noqa: E402
from localchat.store import Store  # noqa: E402
from tests.checkpoints import starter_hf, tiny_model  # noqa: E402

PROSE = Path(__file__).with_name("data_eval_prose.txt")  # held out: the calibration never saw it
# KL divergence of the starter's Q4_K_M on PROSE, importance-weighted over plain: 0.0377 / 0.0589 = 0.64
# in bench_quant_ppl.py; asserted with room for other llama.cpp and torch versions.
KLD_RATIO_MAX = 0.85
# Peak RSS the importance pass may add from one chunk of rows (4) to 24 rows: measured 14 MB (the token ids,
# the allocator's slack); the whole-model forward over all rows at once added 650 MB.
ROW_GROWTH_MAX = 64 * 2**20


@pytest.fixture(scope="module")
def starter_f16(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The starter as an F16 GGUF and its importance matrix file (computed once for the module)."""
    hf = starter_hf(starter_gguf)
    out = tmp_path_factory.mktemp("starter-imatrix")
    plan = plan_gguf(load_checkpoint(hf), "f16")
    f16 = write_gguf(plan, out / "starter-F16.gguf", quiet=True).path
    imatrix_for(plan.ckpt, plan.conv.gguf_name, out / "starter.imatrix.gguf")
    return f16, out / "starter.imatrix.gguf"


@pytest.fixture(scope="module")
def tiny(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer LLaMA with the starter's tokenizer: its matrix takes seconds."""
    return tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("ckpt") / "tiny", starter_hf(starter_gguf))


def test_imatrix_file_is_llama_cpps_format_for_every_layer_weight(starter_f16: tuple[Path, Path]) -> None:
    """The kept file is llama.cpp's GGUF imatrix (general.type imatrix, `<tensor>.in_sum2` sums
    and `<tensor>.counts`), with one entry per 2-D weight of the layers, as long as its rows."""
    f16, path = starter_f16
    r = gguf.GGUFReader(path)
    assert r.get_field("general.type").contents() == "imatrix"
    assert r.get_field("imatrix.chunk_size").contents() == 512
    tensors = {t.name: t for t in r.tensors}
    layer_weights = {t.name: t.shape[0] for t in read_gguf(f16).tensors
                     if t.name.startswith("blk.") and len(t.shape) == 2}
    assert {n.removesuffix(".in_sum2") for n in tensors if n.endswith(".in_sum2")} == set(layer_weights)
    for name, width in layer_weights.items():
        assert tensors[name + ".in_sum2"].n_elements == width, name
        assert tensors[name + ".counts"].data[0] >= 512 * r.get_field("imatrix.chunk_count").contents()


def test_importance_weighted_q4_k_m_is_closer_to_f16_than_plain(starter_f16: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    """On prose the calibration never saw, the starter's Q4_K_M weighted by the matrix has a
    KL divergence from F16 below KLD_RATIO_MAX of llama.cpp's plain Q4_K_M, at the same size;
    both load in llama.cpp, and the weighted file records its matrix as llama-quantize does."""
    from localchat.convert.imatrix import load_imatrix

    f16, path = starter_f16
    plain = quantize(f16, tmp_path / "plain.gguf", "Q4_K_M")
    ours = quantize(f16, tmp_path / "ours.gguf", "Q4_K_M", imatrix=load_imatrix(path))
    assert read_gguf(ours).weights_bytes == read_gguf(plain).weights_bytes  # the metadata adds 192 bytes
    text = PROSE.read_text(encoding="utf-8")
    kld_plain = evaluate(plain, text, base=f16).kld
    kld_ours = evaluate(ours, text, base=f16).kld
    assert kld_ours < KLD_RATIO_MAX * kld_plain, (kld_ours, kld_plain)
    assert read_gguf(ours).metadata["quantize.imatrix.entries_count"] == 210  # 30 layers x 7 weights
    assert "quantize.imatrix.entries_count" not in read_gguf(plain).metadata


def test_convert_weighs_by_an_imatrix_kept_beside_the_model_and_reuses_it(tiny: Path, home: Store,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """`localchat convert --quant q4_k_m` computes the matrix, keeps it in the model's folder and
    quantizes with it; converting the same checkpoint to IQ4_XS under another name reuses it."""
    assert cli(["convert", str(tiny), "--name", "tiny", "--no-check", "-q"]) == 0
    out = capsys.readouterr().out
    assert "importance matrix: 14 weights over" in out and "kept as tiny.imatrix.gguf" in out, out
    assert sorted(p.name for p in (home.root / "tiny").iterdir()) == ["tiny-Q4_K_M.gguf", "tiny.imatrix.gguf"]
    assert read_gguf(home.root / "tiny" / "tiny-Q4_K_M.gguf").metadata["quantize.imatrix.entries_count"] == 14

    assert cli(["convert", str(tiny), "--name", "tiny-iq4", "--quant", "iq4_xs", "--no-check", "-q"]) == 0
    out = capsys.readouterr().out
    assert "importance matrix: reused tiny.imatrix.gguf" in out, out
    assert read_gguf(home.root / home.get("tiny-iq4").files[0].path).quant == "IQ4_XS"
    assert (home.root / "tiny-iq4" / "tiny-iq4.imatrix.gguf").is_file()


def test_no_imatrix_gives_llama_cpps_plain_file(tiny: Path, home: Store, capsys: pytest.CaptureFixture) -> None:
    """`--no-imatrix` writes no matrix and gives, byte for byte, llama.cpp's plain quantization
    of the same F16."""
    assert cli(["convert", str(tiny), "--name", "plain", "--no-imatrix", "--keep-f16", "--no-check", "-q"]) == 0
    assert "importance matrix" not in capsys.readouterr().out
    folder = home.root / "plain"
    assert sorted(p.name for p in folder.iterdir()) == ["plain-F16.gguf", "plain-Q4_K_M.gguf"]
    again = quantize(folder / "plain-F16.gguf", home.root / "again.gguf", "Q4_K_M")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "plain-Q4_K_M.gguf", again)]
    assert digest[0] == digest[1]


@pytest.mark.parametrize("quant", ["iq4_xs", "q3_k_m", "q2_k"])
def test_low_bit_types_without_an_imatrix_are_refused(quant: str, tiny: Path, home: Store,
                                                      capsys: pytest.CaptureFixture) -> None:
    """IQ4_XS, Q3_K_M and Q2_K with --no-imatrix are refused before any work, saying why and what
    to do; the store is left as it was."""
    before = sorted(p.name for p in home.root.iterdir())
    assert cli(["convert", str(tiny), "--name", "low", "--quant", quant, "--no-imatrix", "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{quant.upper()} needs an importance matrix" in err and "--no-imatrix" in err, err
    assert sorted(p.name for p in home.root.iterdir()) == before


def test_calibration_file_chooses_the_matrix_data(tiny: Path, home: Store, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """`--calibration FILE` computes the matrix from that file (the report and the kept file name
    it); a file that is not there is an error naming it, and the store stays empty."""
    text = tmp_path / "mine.txt"
    text.write_text(PROSE.read_text(encoding="utf-8"), encoding="utf-8")
    assert cli(["convert", str(tiny), "--name", "mine", "--calibration", str(text), "--no-check", "-q"]) == 0
    assert f"from {text}" in capsys.readouterr().out
    kept = gguf.GGUFReader(home.root / "mine" / "mine.imatrix.gguf")
    assert kept.get_field("imatrix.datasets").contents() == [str(text)]

    assert cli(["convert", str(tiny), "--name", "gone", "--calibration", str(tmp_path / "gone.jsonl"),
                "--no-check", "-q"]) == 1
    assert str(tmp_path / "gone.jsonl") in capsys.readouterr().err
    assert "gone" not in home.models() and not (home.root / "gone").exists()


def test_auto_mix_fits_the_size_asked_for(tiny: Path, home: Store, capsys: pytest.CaptureFixture) -> None:
    """`--quant auto --size` gives a GGUF whose file fits the size and that llama.cpp loads (the
    check ran on it); a smaller budget takes fewer bits, one below the smallest mix is refused
    naming that size, and auto without --size (or --size without auto) is refused."""
    from localchat.convert.automix import MixError, plan_mix
    from localchat.convert.imatrix import load_imatrix

    assert cli(["convert", str(tiny), "--name", "auto", "--quant", "auto", "--size", "20MB", "--keep-f16", "-q"]) == 0
    assert "auto mix for 20.0 MB" in capsys.readouterr().out
    assert home.get("auto").files[0].size <= 20 * 10**6
    assert home.get("auto").eval["ppl"] > 0

    f16, im = home.root / "auto" / "auto-F16.gguf", load_imatrix(home.root / "auto" / "auto.imatrix.gguf")
    most, planned = plan_mix(f16, im, 10**10)
    assert set(t for n, t in most.items() if n.startswith("blk.")) == {"Q8_0"}
    fewer, smaller = plan_mix(f16, im, planned - 20_000)
    assert smaller <= planned - 20_000 and any(fewer[n] != "Q8_0" for n in fewer if n.startswith("blk."))
    with pytest.raises(MixError, match="the smallest mix of this model is .* MB; ask for at least that"):
        plan_mix(f16, im, 10**6)

    assert cli(["convert", str(tiny), "--name", "nosize", "--quant", "auto", "-q"]) == 1
    assert "--quant auto needs --size" in capsys.readouterr().err
    assert cli(["convert", str(tiny), "--name", "tiny", "--size", "4GB", "-q"]) == 1
    assert "--size applies only to --quant auto" in capsys.readouterr().err


def _hf_forward_imatrix(folder: Path, rows: list[list[int]], names: dict[str, str]) -> dict[str, np.ndarray]:
    """The matrix as the pass computed it before it went layer by layer: transformers' own model, loaded
    whole, over every row in one batch, summing each linear layer's squared inputs."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(key: str):  # noqa: ANN202
        def add(_m: object, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(dim=0)
        return add

    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n + ".weight" in names:
            m.register_forward_pre_hook(hook(names[n + ".weight"]))
    with torch.inference_mode():
        model(torch.tensor(rows), use_cache=False)
    return {k: v.numpy() for k, v in sums.items()}


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM"])
def test_layer_by_layer_matrix_equals_the_whole_model_forward(arch: str, starter_gguf: Path, tmp_path: Path) -> None:
    """The importance pass, a layer at a time and a few rows at a time, gives the matrix of transformers'
    whole model run over all rows at once: every layer weight, each column within 1e-4 of the largest
    (float32 rounding), the same token counts. Gemma 3 gives its sliding-window and global layers
    different masks and rotary tables, so each layer must get its own."""
    from transformers import AutoTokenizer

    from localchat.convert.gptq import calibration_batches, calibration_texts
    from localchat.convert.imatrix import compute_imatrix

    extra = ({"tie_word_embeddings": True, "sliding_window": 64,
              "layer_types": ["sliding_attention", "full_attention"]} if arch.startswith("Gemma") else {})
    folder = tiny_model(arch, tmp_path / "m", starter_hf(starter_gguf), **extra)
    plan = plan_gguf(load_checkpoint(folder), "f16")
    im = compute_imatrix(plan.ckpt, plan.conv.gguf_name, batch_rows=2)
    tok = AutoTokenizer.from_pretrained(str(folder))
    rows = [r["input_ids"] for r in calibration_batches(tok, calibration_texts(tok), 512, 64)]
    assert im.chunk_count == len(rows) > 2  # more rows than a chunk holds, and an odd last chunk
    names = {n: plan.conv.gguf_name(n) for n in plan.ckpt.names() if plan.conv.gguf_name(n) in im.sums}
    ref = _hf_forward_imatrix(folder, rows, names)
    assert set(ref) == set(im.sums) and len(ref) == 14
    for key, want in ref.items():
        assert np.abs(im.sums[key] - want).max() <= 1e-4 * np.abs(want).max(), key
        assert im.counts[key] == len(rows) * 512, key


# Computes the matrix of a model over the first N rows of a calibration file and prints its own peak RSS.
MATRIX_PEAK = """
import sys
from localchat.convert.checkpoint import load_checkpoint
from localchat.convert.imatrix import compute_imatrix
from localchat.convert.to_gguf import plan_gguf
plan = plan_gguf(load_checkpoint(sys.argv[1]), "f16")
im = compute_imatrix(plan.ckpt, plan.conv.gguf_name, sys.argv[2], samples=int(sys.argv[3]), device="cpu")
assert im.chunk_count == int(sys.argv[3]), im.chunk_count
from localchat.hardware.memory import peak_rss
print(peak_rss())
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc")
def test_importance_pass_memory_does_not_grow_with_rows(starter_gguf: Path, tmp_path: Path) -> None:
    """The importance pass over 24 calibration rows peaks less than ROW_GROWTH_MAX above the same pass over
    one chunk of rows, on a LLaMA whose MLP activations are 8 MB a tensor for each row of 512 tokens: the
    rows wait on disk between layers and go through a layer a chunk at a time. The whole-model forward
    over all rows at once grew by ~30 MB a row here (650 MB from 4 to 24 rows; ~130 MB a row at 7B)."""
    import subprocess
    import sys
    from importlib import resources

    from localchat.convert.imatrix import DEFAULT_BATCH_ROWS

    folder = tiny_model("LlamaForCausalLM", tmp_path / "wide", starter_hf(starter_gguf), hidden_size=256,
                        intermediate_size=4096)
    prose = resources.files("localchat.convert").joinpath("data", "calibration_prose.txt").read_text("utf-8")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n\n".join([prose] * 30), encoding="utf-8")  # ~600 tokens a copy: 24 rows and more
    peaks = {}
    for rows in (DEFAULT_BATCH_ROWS, 24):
        r = subprocess.run([sys.executable, "-c", MATRIX_PEAK, str(folder), str(calibration), str(rows)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[rows] = int(r.stdout.split()[-1])
    growth = peaks[24] - peaks[DEFAULT_BATCH_ROWS]
    assert growth < ROW_GROWTH_MAX, f"{growth / 1e6:.0f} MB more for {24 - DEFAULT_BATCH_ROWS} more rows ({peaks})"
