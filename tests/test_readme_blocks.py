"""experiments/readme_blocks.py: the answers the README and docs/results.md open with, in
words, from made-up runs."""

from fake_runs import seed_run


def test_main_command_block_sets_its_difference_beside_the_converged_one():
    """One sentence says whether the main command's sign is the converged study's, and how
    far apart the two paired differences are."""
    from readme_blocks import main_command

    main = [seed_run("m-soft", "softmax", 0, 0.76, 0.76), seed_run("m-arc", "arcface", 0,
                                                                     0.80, 0.80)]
    converged = [seed_run(f"c-{loss}{seed}", loss, seed, top1, top1) for loss, seed, top1 in (
        ("softmax", 0, 0.90), ("softmax", 1, 0.91), ("arcface", 0, 0.89),
        ("arcface", 1, 0.90))]
    assert main_command(main, converged).startswith(
        "**At this budget arcface s=8 m=0.3 monotonic's mean test top-1 is +4.00 points from "
        "softmax's; with 1 paired seed(s) that is an anecdote, not a comparison yet. At "
        "convergence, every head trained by airbench's recipe (tuned for softmax), the same "
        "head's paired difference is -1.00 points over 2 seeds: the sign differs, 5.00 points "
        "apart.**")
    assert "At convergence" not in main_command(main, [])
    # Runs on two CPU types say so (float32 results differ between them by rounding).
    from readme_blocks import cpu_types

    assert cpu_types(main) == ""
    main[1]["config"]["machine"] = {"model": "Intel(R) Xeon(R) Processor"}
    assert cpu_types(main) == ("\nThese runs ran on more than one CPU type: Intel Xeon (1 run), "
                               "an unrecorded CPU (1 run).\n")
    # One model name over two generations: their family/model numbers tell them apart.
    main[0]["config"]["machine"] = {"model": "AMD EPYC", "family": "25/17"}
    main[1]["config"]["machine"] = {"model": "AMD EPYC", "family": "25/1"}
    assert cpu_types(main) == ("\nThese runs ran on more than one CPU type: AMD EPYC (family/"
                               "model 25/1) (1 run), AMD EPYC (family/model 25/17) (1 run).\n")
    main[1]["config"]["machine"]["family"] = "25/17"
    assert cpu_types(main) == ""


def test_a_paired_difference_in_words_names_its_direction_and_interval():
    import readme_blocks

    assert readme_blocks._words("-0.76 (-0.95, -0.57)", (-0.95, -0.57), 5) == \
        "lower by 0.76 points (95 % CI 0.57 to 0.95)"
    assert readme_blocks._words("+4.48 (+3.07, +5.90)", (3.07, 5.90), 3) == \
        "higher by 4.48 points (95 % CI 3.07 to 5.90)"
    assert readme_blocks._words("+0.35 (-0.23, +0.93)", (-0.23, 0.93), 5) == \
        "within noise (+0.35 points, 95 % CI -0.23 to +0.93)"
    assert readme_blocks._words("-1.14", None, 1) == "-1.14 points (1 pair, no interval)"


def test_the_headline_is_the_study_at_each_heads_choice_once_it_pairs():
    """Converged runs at airbench's own settings and at each head's choice are two studies;
    the headline is the chosen one once a margin head pairs with softmax in it, the other
    stands beside it."""
    import head_recipes
    import readme_blocks
    import report

    def run(loss, seed, top1, smoothing):
        made = seed_run(f"{loss}{seed}-{smoothing}", loss, seed, top1, top1)
        made["config"] |= {"label_smoothing": smoothing, "mixed_precision": True}
        if loss == "arcface":
            made["config"]["margin"] = 0.1
        return made

    as_tuned = [run("softmax", 0, 0.90, 0.2), run("softmax", 1, 0.91, 0.2),
                run("arcface", 0, 0.89, 0.2), run("arcface", 1, 0.90, 0.2)]
    chosen_arcface = [run("arcface", 0, 0.905, 0.0)]
    chosen = {loss: head_recipes.airbench_settings(loss) for loss in head_recipes.HEADS}
    chosen["arcface"] = head_recipes.candidate(0.0, 8.0, 0.1, head_recipes.RATE)
    choices = {loss: (key, []) for loss, key in chosen.items()}
    studies = report.converged_studies(as_tuned + chosen_arcface, choices)
    assert studies["as tuned for softmax"] == as_tuned
    assert studies["chosen"] == as_tuned[:2] + chosen_arcface
    assert not readme_blocks.is_paired(studies["chosen"])  # one seed: the headline waits
    chosen_arcface.append(run("arcface", 1, 0.915, 0.0))
    studies = report.converged_studies(as_tuned + chosen_arcface, choices)
    assert readme_blocks.is_paired(studies["chosen"])
    assert readme_blocks.headline(studies["chosen"], "chosen").startswith(
        "**What the margin buys at convergence, every head at the settings chosen for it on "
        "validation (docs/recipe.md), paired by seed against softmax: arcface s=8 m=0.1 "
        "monotonic LS 0.0, 2 seeds: top-1 higher by 0.50 points")
    beside = readme_blocks.beside_headline(studies, "chosen", waiting=0)
    assert beside.startswith("Beside it, the study at airbench's own settings:\n\n**What the "
                             "margin buys at convergence, every head trained by airbench's")
    assert "top-1 lower by 1.00 points" in beside
    assert readme_blocks.beside_headline(studies, "as tuned for softmax", waiting=2) == (
        "The selection has not chosen for 2 of the 4 heads yet.\n")
