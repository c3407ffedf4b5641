"""Fine-tune settings: one typed model that also generates the `localchat finetune` flags."""

from __future__ import annotations

from dataclasses import dataclass

from localchat.datasets import HELD_OUT, HOLD_OUT_FROM
from localchat.options import Options, option

CHECKPOINTS = "checkpoints"  # the resume checkpoints' folder in `<store>/<name>/finetune/`
DEQUANTIZED = "hf"  # the folder in `<store>/<name>/` of a GGUF base dequantized for training

LORA_LR = 2e-3  # a few rows move the model (2e-4 was too little: README, fine-tuning defaults)
# Over an NF4 base 2e-3 reached loss 0.10 by update 5, then climbed back to 2.5; at 2e-4, with each
# packed row attending only to itself, the QLoRA test's fact was not learned; 5e-4 and 1e-3 learned it.
QLORA_LR = 5e-4


@dataclass(frozen=True)
class TrainSettings(Options):
    option_group = "training"
    epochs: float = option(3.0, "passes over the training rows", 0.01, 1000.0)
    min_updates: int = option(60, "repeat small datasets until this many updates", 1, 1_000_000)
    lr: float | None = option(None, "peak learning rate, linear warm-up then linear decay (default: "
                                    f"{LORA_LR:g}; {QLORA_LR:g} over a 4-bit QLoRA base, where {LORA_LR:g} diverged)",
                                    1e-7, 1.0)
    lora_r: int = option(16, "LoRA rank", 1, 1024)
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r)", 1, 4096)
    lora_dropout: float = option(0.05, "dropout on the LoRA path", 0.0, 0.9)
    neftune_alpha: float = option(5.0, "NEFTune: noise of this scale on the input embeddings while training "
                                       "(0: none)", 0.0, 100.0)
    augment: int = option(3, "copies of each chat row with words of its questions dropped at random, so a fact "
                             "is found from other wordings (finetune/augment.py; 0: none)", 0, 100)
    augment_drop: float = option(0.25, "the share of a question's words each augmented copy drops", 0.0, 0.9)
    target: tuple[str, ...] | None = option(None, "module names to adapt (default: every linear layer of a "
                                                   "block, as the model's architecture names them)")
    max_len: int | None = option(None, "tokens per sequence (default: from memory)", 32, 131072)
    batch_size: int | None = option(None, "sequences per step (default: from memory)", 1, 4096)
    grad_accum: int = option(1, "steps of gradients added before each update", 1, 1024)
    pack: bool = option(True, "pack rows into full sequences (no compute spent on padding)")
    replay: int = option(64, "general conversations trained on beside your rows, so the model keeps answering "
                            "other questions as before (finetune/replay.py; 0: none)", 0, 1000)
    replay_share: float = option(0.8, "the replay rows' share of each update's loss (the user's rows have "
                                      "the rest)", 0.0, 0.95)
    replay_kl: bool = option(True, "train the replay answers toward the base's whole next-token distribution "
                                   "(a KL term; localchat's shipped answers, nothing generated) rather than the "
                                   "base's greedy answers, generated first")
    held_out: float | None = option(None, "fraction of rows kept out of training to measure loss and recall "
                                          f"(default: {HELD_OUT:g} of a set of {HOLD_OUT_FROM} rows or more; a "
                                          "smaller one trains on every row, as one row may be all that teaches "
                                          "a fact)", 0.0, 0.5)
    early_stop: bool = option(False, "measure the held-out loss after every pass over the data and keep the "
                                     "adapter of the pass where it was lowest")
    save_every: int = option(50, "save a checkpoint every N updates", 1, 1_000_000)
    seed: int = option(0, "seed for data order, LoRA init and dropout", 0, 2**31 - 1)
    qlora: bool | None = option(None, "4-bit NF4 base with bitsandbytes (default: on with CUDA; "
                                      "works on a CPU too, for tests and small models)")
    gpu_memory: float | None = option(None, "GiB of GPU memory training may take (default: what is free): the "
                                            "sequence length and batch are chosen to fit it, and the allocator "
                                            "refuses more, so another program keeps the rest", 0.5, 4096.0)
    gradient_checkpointing: bool | None = option(None, "recompute activations to save memory "
                                                 "(default: on with CUDA, where memory is the limit)")
    chat_format: str | None = option(None, "render rows with this chat format instead of the model's template")
    bf16: bool | None = option(None, "bfloat16 autocast for the matmuls (default: on where the hardware "
                                     "runs bf16 natively: CPUs with AMX or AVX512-BF16, CUDA cards with bf16)")

    def cpu_shape(self) -> tuple[int, int]:
        """(tokens per sequence, sequences per step) on a CPU, where memory seldom limits them: what the
        user set, else 512 tokens, one packed sequence (four unpacked rows) a step. A GPU's shape comes
        from its memory (finetune/train.py)."""
        return self.max_len or 512, self.batch_size or (1 if self.pack else 4)


def default_lr(qlora: bool) -> float:
    """The peak learning rate when none is given: QLoRA's 4-bit base takes the smaller one."""
    return QLORA_LR if qlora else LORA_LR
