"""The one log line per finished round that a deployed run streams (`confide deploy run`)."""

from __future__ import annotations

from confide.server.federation import round_line

ROW = {"round": 2, "accuracy": 0.75, "loss": 0.5, "num_clients_aggregated": 3,
       "num_clients_sampled": 4, "epsilon_example_level": {"p-a": 1.25, "p-b": 2.5}}


def test_classification_line_names_accuracy_loss_and_epsilon() -> None:
    line = round_line(ROW, 5, example_dp=True)
    assert line == ("Confide round 2/5: accuracy 0.7500, loss 0.5000, aggregated 3/4, "
                    "example-level epsilon max 2.500 (p-a 1.250, p-b 2.500)")


def test_causal_lm_line_leads_with_perplexity_and_names_next_token_accuracy() -> None:
    line = round_line({**ROW, "perplexity": 41.234}, 5, example_dp=True)
    assert line.startswith("Confide round 2/5: perplexity 41.23, next-token accuracy 0.7500, "
                           "loss 0.5000, aggregated 3/4")
    # the last round (or every generate-every rounds) also scores generated completions
    final = round_line({**ROW, "perplexity": 3.5, "bleu": 12.34, "rouge_l": 40.0}, 2,
                       example_dp=True)
    assert final.startswith("Confide round 2/2: perplexity 3.5, BLEU 12.3, ROUGE-L 40.0, "
                            "next-token accuracy 0.7500")


def test_a_run_without_example_dp_prints_no_epsilon() -> None:
    # its accountants hold no events: 0.000 would read as perfect privacy
    line = round_line({**ROW, "epsilon_example_level": {"p-a": 0.0, "p-b": 0.0}}, 5,
                      example_dp=False)
    assert line == ("Confide round 2/5: accuracy 0.7500, loss 0.5000, aggregated 3/4, "
                    "example-level DP off")
