"""`revive ablate`: post-hoc variants of a run's accumulated edit, checked against the run and the math."""
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_eval_harness import TINY_MEMIT

from revive_plugin.adapters import easyedit
from revive_plugin.cli import main
from revive_plugin.eval.ablate import expand_variants, variant_delta
from revive_plugin.eval.harness import Run, RunConfig, read_rows
from revive_plugin.plugins.prune import restrain
from revive_plugin.spectral import protected_basis, safe_update

NAME = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A finished 4-edit MEMIT run on the tiny LLaMA (layers 0 and 1), with perplexity measured."""
    root = tmp_path_factory.mktemp("ablate")
    hp = root / "tiny-memit.yaml"
    # A plugin block in the hparams file, as the shipped ones have: ablate must read it as the run did.
    hp.write_text(yaml.safe_dump({**TINY_MEMIT, "model_name": str(tiny_model_dir), "revive": {"tau": 0.3}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REVIVE_CACHE", str(root / "cache"))
        config = RunConfig.from_dict({
            "name": "tiny", "hparams": str(hp), "edits": 4, "batch_size": 2, "eval_every": 2, "eval_facts": "all",
            "glue": {"tasks": [], "n_per_task": 0, "few_shot": 0, "dir": None},
            "ppl": {"data": None, "n": 12, "max_tokens": 24}, "fluency_prompts": 0, "eval_last_batch": False,
            "output": str(root / "{name}"), "device": "cpu"})
        out = Run.start(config).execute()
        easyedit.disable_easyedit()
        yield out


def test_ablate_reproduces_the_run_and_scores_each_variant(run_dir, capsys):
    assert main(["ablate", str(run_dir), "--variants", "as-run", "unedited", "revert:each", "scale:0",
                 "--facts", "3"]) == 0
    printed = capsys.readouterr().out
    rows = {r["variant"]: r for r in read_rows(run_dir / "ablation" / "ablation.jsonl")}
    assert list(rows) == ["as-run", "unedited", "revert:0", "revert:1", "scale:0"]
    last = read_rows(run_dir / "metrics.jsonl")[-1]
    # The checkpoint's weights rebuilt on a fresh model give the run's own last perplexity.
    assert rows["as-run"]["ppl"] == pytest.approx(last["ppl"], rel=1e-5)
    assert rows["as-run"]["delta_rel/1"] > 0 and rows["as-run"]["facts_evaluated"] == 3
    # Unedited: the run's pre-edit perplexity, no edit left; scale 0 is the same model.
    assert rows["unedited"]["ppl_rel"] == pytest.approx(1.0, rel=1e-5)
    assert rows["unedited"]["delta_rel/0"] == 0 and rows["scale:0"]["ppl"] == pytest.approx(rows["unedited"]["ppl"])
    # Reverting a layer removes its edit only.
    assert rows["revert:0"]["delta_rel/0"] == 0 and rows["revert:0"]["delta_rel/1"] == rows["as-run"]["delta_rel/1"]
    assert "| revert:1 |" in printed and (run_dir / "ablation" / "ablation.md").exists()
    # The run's checkpoint is untouched, and a second call scores only what is missing.
    saved = load_file(str(run_dir / "checkpoint" / "weights.safetensors"))
    assert main(["ablate", str(run_dir), "--variants", "as-run", "only:1", "--facts", "3"]) == 0
    again = read_rows(run_dir / "ablation" / "ablation.jsonl")
    assert [r["variant"] for r in again][-1] == "only:1" and len(again) == 6
    assert all(torch.equal(v, load_file(str(run_dir / "checkpoint" / "weights.safetensors"))[k])
               for k, v in saved.items())


def test_bad_variants_and_facts_are_refused_before_anything_runs(run_dir, capsys):
    assert main(["ablate", str(run_dir), "--variants", "revert:5"]) == 2
    assert "layer 5 is not an edited layer ([0, 1])" in capsys.readouterr().err
    assert main(["ablate", str(run_dir), "--variants", "scale:big"]) == 2
    assert "'big' is not a number" in capsys.readouterr().err
    assert main(["ablate", str(run_dir), "--facts", "some"]) == 2
    assert "--facts must be a positive integer or 'all', got 'some'" in capsys.readouterr().err
    assert main(["ablate", str(run_dir.parent)]) == 2
    assert "has no checkpoint/weights.safetensors" in capsys.readouterr().err


def test_variant_math():
    torch.manual_seed(0)
    w0 = torch.randn(12, 20, dtype=torch.float64)
    delta = torch.randn(12, 20, dtype=torch.float64) * 3
    assert expand_variants(["revert:each", "prune:e"], [4, 8]) == ["revert:4", "revert:8", "prune:e"]
    # REVIVE once on the whole edit: the paper's projection with W₀'s basis at τ.
    torch.testing.assert_close(variant_delta("revive:0.4", NAME, delta, w0, [1]), safe_update(delta, w0, 0.4))
    basis = protected_basis(w0, 0.4)
    assert (basis.u.T @ variant_delta("revive:0.4", NAME, delta, w0, [1])).abs().max() < 1e-10
    # PRUNE once: the singular values above σ_max(W₀) mapped by f, the rest and the vectors kept.
    s0 = float(torch.linalg.matrix_norm(w0, ord=2))
    s = torch.linalg.svdvals(delta)
    expected = torch.where(s >= s0, restrain(s, s0, math.e), s)
    torch.testing.assert_close(torch.linalg.svdvals(variant_delta("prune:e", NAME, delta, w0, [1])),
                               expected.sort(descending=True).values)
    # Dropping the top R directions leaves the other singular values.
    torch.testing.assert_close(torch.linalg.svdvals(variant_delta("drop-top:2", NAME, delta, w0, [1]))[:10], s[2:])
    torch.testing.assert_close(variant_delta("scale:0.5", NAME, delta, w0, [1]), 0.5 * delta)
    assert torch.equal(variant_delta("only:0", NAME, delta, w0, [0, 1]), torch.zeros_like(delta))


def test_ablation_rows_say_which_checkpoint_they_score(run_dir, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "ablation.jsonl").write_text(json.dumps({"variant": "as-run", "edits": 99}) + "\n")
    assert main(["ablate", str(run_dir), "--variants", "as-run", "--output", str(out)]) == 2


def test_ablate_help_names_the_default_variants(capsys):
    from revive_plugin.eval.ablate import DEFAULT_VARIANTS

    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    assert " ".join(DEFAULT_VARIANTS) in " ".join(capsys.readouterr().out.split())
