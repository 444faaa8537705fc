"""A run without QLoRA imports no bitsandbytes and prints no deprecation warning from the model setup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, warnings
warnings.simplefilter("default")  # show every FutureWarning once, as a plain run would
from silotune.adapters import AdapterModel
from silotune.config import LoraSpec, MethodSpec, ModelSpec
model = ModelSpec(name_or_path="tiny-llama", max_seq_len=64)
AdapterModel.create(model, LoraSpec(r=4), seed=0, method=MethodSpec(name="lora"))
print("bitsandbytes imported:", "bitsandbytes" in sys.modules)
"""


def test_lora_neither_imports_bitsandbytes_nor_warns() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bitsandbytes imported: False" in proc.stdout
    assert "is_gradient_checkpointing" not in proc.stderr and "gemm_4bit_forward" not in proc.stderr
