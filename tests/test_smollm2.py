"""A real easyeditor MEMIT edit on the embedded SmolLM2-135M with REVIVE (slow: ~2–5 min on 2 CPU cores)."""
import contextlib
import io

import pytest
import torch

from revive_plugin import protected_basis
from revive_plugin.adapters import easyedit
from revive_plugin.adapters.compat import import_easyeditor
from revive_plugin.adapters.demo import DEFAULT_HPARAMS
from revive_plugin.eval.scoring import score_continuations

pytestmark = pytest.mark.slow


def test_memit_with_revive_on_smollm2():
    easyedit.enable_easyedit(device="cpu")
    try:
        MEMITHyperParams = import_easyeditor("easyeditor.models.memit.memit_hparams").MEMITHyperParams
        hp = MEMITHyperParams.from_hparams(str(DEFAULT_HPARAMS))
        hp.v_num_grad_steps = 15
        assert hp.plugin_configs["revive"] == {"tau": 0.1, "basis": "original"}
        editor = import_easyeditor("easyeditor.editors.editor").BaseEditor.from_hparams(hp)
        model, tok = editor.model, editor.tok
        names = [f"model.layers.{l}.mlp.down_proj.weight" for l in hp.layers]
        w0 = {n: model.get_parameter(n).detach().clone() for n in names}
        prompt, new, true = "The mother tongue of Danielle Darrieux is", "English", "French"
        before = score_continuations(model, tok, [prompt, prompt], [new, true])
        with contextlib.redirect_stdout(io.StringIO()):
            editor.edit(prompts=[prompt], target_new=[new], ground_truth=[true], subject=["Danielle Darrieux"],
                        keep_original_weight=False, verbose=False)
        after = score_continuations(model, tok, [prompt, prompt], [new, true])
        assert after[0].prob > 2 * before[0].prob  # the edit took, through the filter
        assert after[0].prob > after[1].prob
        rec = easyedit.step_records(model)[-1]
        assert sorted(rec.transformed) == sorted(names)
        for n in names:
            delta = model.get_parameter(n).detach() - w0[n]
            b = protected_basis(w0[n], 0.1)
            assert b.k > 1 and rec.metrics[f"revive/{n}/k"] == b.k
            assert float((b.u.T.float() @ delta).norm()) < 1e-4 * float(delta.norm())
            assert float((delta @ b.v.float()).norm()) < 1e-4 * float(delta.norm())
    finally:
        easyedit.disable_easyedit()


def test_cli_eval_on_smollm2(tmp_path):
    """A short real run through the CLI: one MEMIT+REVIVE edit, one checkpoint, a GLUE probe, the report."""
    import json

    from revive_plugin.cli import main

    out = tmp_path / "run"
    try:
        code = main(["eval", "smollm2-memit-revive", "--edits", "1", "--batch-size", "1", "--eval-every", "1",
                     "--set", "glue.tasks=[sst2]", "--set", "glue.n_per_task=10",
                     "--set", "hparams_overrides.v_num_grad_steps=10",
                     "--set", "device=cpu", "--output", str(out)])
    finally:
        easyedit.disable_easyedit()
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["edits"] for r in rows] == [0, 1]
    assert 0.0 <= rows[-1]["efficacy_score"] <= 1.0 and "glue_sst2_accuracy" in rows[-1]
    assert rows[-1]["spectral/model.layers.8.mlp.down_proj.weight/k"] >= 1
    assert "smollm2-memit-revive" in (out / "summary.md").read_text()
