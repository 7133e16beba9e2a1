"""The README's Python runs as written.

Every ```python block of README.md is executed, each in a fresh interpreter as a reader would run
it (so ``fj.use_cpu_cores()`` runs before JAX starts, as the README says it must). The zoo the quickstart
reads is replaced by tiny random BERT models with the MiniLM tokenizer, written where the README
looks for it (``$HOME/.cache/fisher_jax/zoo/minilm/seed0``), and ``../shared/glue`` resolves to the
real GLUE copy; the working directory is a temporary folder, so nothing lands in the checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import GLUE_DIR, REPO


def _python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_a_complete_quickstart():
    blocks = _python_blocks()
    assert blocks, "README.md has no ```python block"
    quick = blocks[0]
    for needed in ("fj.from_pretrained", "fj.mask_fisher", "fj.merge", "evaluate(", "save_pretrained"):
        assert needed in quick, f"the quickstart no longer shows {needed}"


def _tiny_zoo(root: Path, minilm: str) -> None:
    import transformers as tf

    from fisher_jax.models import from_config

    tok = tf.AutoTokenizer.from_pretrained(minilm)
    for task, labels in (("sst2", 2), ("stsb", 1)):
        cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=512, num_labels=labels)
        model = from_config(cfg, num_labels=labels, seed=len(task))
        folder = root / task
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))


def test_readme_python_runs(tmp_path, minilm_path, glue_dir):
    home = tmp_path / "home"
    _tiny_zoo(home / ".cache" / "fisher_jax" / "zoo" / "minilm" / "seed0", minilm_path)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "glue").symlink_to(Path(glue_dir).resolve())
    env = {**os.environ, "HOME": str(home), "FISHER_JAX_CACHE": str(tmp_path / "cache"),
           "GLUE_DIR": str(GLUE_DIR), "JAX_NUM_CPU_DEVICES": ""}
    env.pop("JAX_NUM_CPU_DEVICES")
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # no device-count flag, as a reader has; fast compiles
    outputs = []
    for i, block in enumerate(_python_blocks()):  # each block as a reader runs it: a fresh interpreter
        script = work / f"readme_{i}.py"
        script.write_text(block)
        proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"README python block {i}: " + proc.stderr[-3000:]
        outputs.append(proc)
    proc = outputs[0]
    lines = [ln.split() for ln in proc.stdout.splitlines() if ln.split()[:1] in (["sst2"], ["stsb"])]
    assert [ln[0] for ln in lines] == ["sst2", "stsb"], proc.stdout
    for _, score in lines:
        assert -1.0 <= float(score) <= 1.0
    assert (work / "merged_sst2" / "config.json").is_file()
