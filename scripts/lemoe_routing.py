"""Where LEMoE's KV-anchor routing sends tokens, with and without reference-corpus floors (no training needed).

Routing depends only on the anchors' keys (the FFN input at each edited subject's last token), so this reads
the keys of the held-out calibration batch and measures, for each route_threshold θ, with one global θ and with
each anchor's threshold raised above its highest cosine with the reference corpus (``reference_corpus``):

* ordinary text: the share of tokens of the shipped ME-PPL perplexity sentences routed to some expert (each
  one gets an expert's output; these sentences are not in the reference corpus);
* neighbourhood: the share of tokens of each record's first neighbourhood prompt routed to some expert;
* paraphrases: the share of the records' first two paraphrase prompts whose subject token routes to the
  record's own anchor.

A third variant, θ alone with keys and tokens centred on the reference corpus's mean FFN input (so that the
direction all hidden states share does not make unrelated tokens look alike), is the alternative that was tried.

    python scripts/lemoe_routing.py --data ../shared/data/counterfact/counterfact.json.gz \
        --output docs/calibration/lemoe-floors/routing.md
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from revive_plugin.adapters.lemoe import LEMoEHyperParams, anchor_floors, request_keys, route, token_inputs
from revive_plugin.adapters.models import load_model
from revive_plugin.adapters.stats import load_corpus
from revive_plugin.eval.calibrate import heldout_cases
from revive_plugin.eval.harness import RunConfig
from revive_plugin.eval.perplexity import load_sentences
from revive_plugin.eval.report import markdown_table

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "eval" / "configs" / "smollm2-lemoe.yaml"))
    parser.add_argument("--data", required=True, help="CounterFact (ROME format) with held-out records")
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    parser.add_argument("--output", type=Path, default=None, help="Markdown file for the table")
    args = parser.parse_args()

    config = RunConfig.from_yaml(args.config, [f"data={args.data}", "order=seeded"])
    cases = heldout_cases(config, args.records)
    hparams = LEMoEHyperParams.from_hparams(str(ROOT / config.hparams))
    if not hparams.reference_corpus:
        raise SystemExit(f"{config.hparams} sets no reference_corpus: nothing to compare")
    model, tok = load_model(hparams.model_name)
    torch.set_grad_enabled(False)
    keys = request_keys(model, tok, [c.to_request() for c in cases], hparams)
    owners = torch.arange(len(cases))
    corpus = load_corpus(str(hparams.reference_corpus))  # read as the editor reads it (reference_inputs), once
    reference = token_inputs(model, tok, hparams.ffn_name, list(corpus.texts[: hparams.reference_samples]), unit=False)
    floors = anchor_floors(keys, F.normalize(reference, dim=-1), hparams.route_margin)
    mean = reference.mean(0)
    paraphrases = [{"prompt": p, "subject": c.subject} for c in cases for p in c.rephrase_prompts[:2]]
    paraphrase_keys = request_keys(model, tok, paraphrases, hparams)
    paraphrase_owner = torch.tensor([i for i, c in enumerate(cases) for _ in c.rephrase_prompts[:2]])
    ordinary = token_inputs(model, tok, hparams.ffn_name, load_sentences(), unit=False)
    neighbourhood = token_inputs(model, tok, hparams.ffn_name, [c.neighborhood_prompts[0] for c in cases], unit=False)

    variants = [("θ only", 0.0, None),
                ("θ only, centred on the corpus mean", mean, None),
                (f"θ and floors ({hparams.reference_corpus}, {hparams.reference_samples} texts, "
                 f"m = {hparams.route_margin})", 0.0, floors)]
    rows = []
    for theta in args.thresholds:
        for label, centre, f in variants:
            keys_c = F.normalize(keys - centre, dim=-1)
            rows.append({
                "route_threshold": theta, "routing": label,
                "ordinary tokens routed": float((route(ordinary - centre, keys_c, owners, theta, f) >= 0).float().mean()),
                "neighbourhood tokens routed": float(
                    (route(neighbourhood - centre, keys_c, owners, theta, f) >= 0).float().mean()),
                "paraphrase subjects to own expert": float(
                    (route(paraphrase_keys - centre, keys_c, owners, theta, f) == paraphrase_owner).float().mean()),
            })
    text = (f"# LEMoE routing on {len(cases)} held-out records ({hparams.ffn_name})\n\n"
            f"{ordinary.shape[0]} tokens of the shipped ME-PPL perplexity sentences, {neighbourhood.shape[0]} tokens of "
            f"the records' first neighbourhood prompts, {len(paraphrases)} paraphrase prompts. Anchors whose floor "
            f"exceeds 1 (never routed): {int((floors > 1).sum())}.\n\nCommand: `python scripts/lemoe_routing.py "
            f"--data {args.data} --records {args.records}`\n\n"
            + markdown_table(list(rows[0]), [list(r.values()) for r in rows], floatfmt=".3f") + "\n")
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
