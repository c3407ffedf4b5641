"""The CPU LoRA speed-ups keep PEFT's results: dropout rate, scaling and gradients; the same
loss without the float32 round trip."""

from __future__ import annotations

import pytest
import torch

from localchat.finetune.lora_layers import FastDropout, speed_up_lora


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_rate_and_scale(p: float) -> None:
    torch.manual_seed(0)
    drop = FastDropout(p).train()
    x = torch.ones(1000, 1000)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.002  # 1e6 draws: standard error ~3e-4
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    # Each of the four 16-bit lanes of a draw is uniform on its own (no stuck sign bit).
    lanes = (y.flatten()[: 4 * (y.numel() // 4)] == 0).float().view(-1, 4).mean(0)
    assert torch.all((lanes - p).abs() < 0.004), lanes


def test_independent_masks_and_seeded() -> None:
    drop = FastDropout(0.5).train()
    torch.manual_seed(1)
    a, b = drop(torch.ones(4096)), drop(torch.ones(4096))
    assert (a != b).float().mean() > 0.4  # two calls, two masks
    torch.manual_seed(1)
    assert torch.equal(drop(torch.ones(4096)), a)  # torch.manual_seed makes runs repeatable


def test_gradient_is_the_mask_and_eval_passes_through() -> None:
    drop = FastDropout(0.2).train()
    x = torch.randn(64, 32, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.8))
    assert torch.all(x.grad[~kept] == 0)
    drop.eval()
    assert drop(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout rate"):
        FastDropout(1.0)


def _tiny_lora(dropout: float, dtype: torch.dtype = torch.float32):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(transformers.LlamaForCausalLM(cfg).to(dtype), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False))  # non-zero B, so the LoRA path shows in the loss
    return model


def test_swaps_peft_lora_dropout() -> None:
    model = _tiny_lora(0.1)
    assert speed_up_lora(model, autocast=False) == 2 * 3
    drops = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]
    assert drops and all(isinstance(d, FastDropout) and d.p == 0.1 for d in drops)
    ids = torch.randint(0, 64, (2, 16))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # trains through the swapped modules
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_bf16_base_under_autocast_gives_peft_loss_without_the_round_trip() -> None:
    """Same loss and LoRA gradients as PEFT's own float32 cast, on a bf16 base under autocast,
    with the adapters' input left in bf16."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for tuned in (False, True):
        model = _tiny_lora(0.0, torch.bfloat16)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        if tuned:
            speed_up_lora(model, autocast=True)
        seen: set[torch.dtype] = set()
        for name, module in model.named_modules():
            if name.endswith("lora_A.default"):
                module.register_forward_pre_hook(lambda mod, args: seen.add(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss), grads, seen))
    (loss_a, grads_a, seen_a), (loss_b, grads_b, seen_b) = results
    assert seen_a == {torch.float32} and seen_b == {torch.bfloat16}
    assert abs(loss_a - loss_b) < 1e-2 * abs(loss_a)
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], rtol=5e-2, atol=1e-3), name
