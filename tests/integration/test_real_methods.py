"""One real-model round per post-training method (SmolLM2-135M on CPU; ~2 minutes on 2 cores).

The same round as the tiny-model contract, through bench/methods_real.py's round function:
the holdout loss falls and the published artifact reloads to identical logits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.real_model]

ROOT = Path(__file__).resolve().parents[2]


# LoRA runs in every CI run; the other methods' real-model rounds (about 8 minutes together on 2 loaded
# cores) run in the full tier (SILOTUNE_FULL=1): the tiny-model contract test runs every method each time.
@pytest.mark.parametrize(
    "method", ["lora", *(pytest.param(m, marks=pytest.mark.slow) for m in ("qlora", "ia3", "prompt_tuning", "full"))]
)
def test_real_model_round(method: str, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from methods_real import _round

    from silotune.demo import make_demo_silos

    data = make_demo_silos(tmp_path / "data", seed=0, scale=0.1)
    args = argparse.Namespace(
        model="smollm2-135m-instruct", steps=2, batch=4, seq=128, eval_examples=4, threads=2
    )
    row = _round(method, "sft", {n: data[n] for n in ("clinic", "bank")}, tmp_path / method, args)
    assert row["loss_after"] < row["loss_before"], row
    assert row["reload_max_abs_diff"] < 1e-4, row
