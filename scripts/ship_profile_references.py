"""Ship the simulated studies chapter 04 needs on a profile (maintainers' tool).

Chapter 04 calibrates its verdicts on studies simulated from its own features
(``simulation.simulate_tests``) and judges divergence against a family of planted
backprops (``divergence.simulate_family``). Both read a table shipped in
``gradbrain/reference`` when one matches the chapter's settings and features (the key and
a fingerprint of the features), and simulate only what is missing. This script makes
those calls exactly as chapter 04 makes them on ``--profile`` (its parameters from
``params/<profile>.yaml``, its study built by the data chapter's defaults), then writes
the two tables. The demo's tables were made with the benchmarks that measured them
(``benchmarks/fpr_hierarchy.py``, ``benchmarks/divergence_family.py``); this script
ships the tiny profile's, so that the test suite's tiny book reads them instead of
simulating its ten studies (about 70 s on 2 cores) — the simulation itself is tested in
``tests/test_hierarchy.py`` and ``tests/test_divergence.py``.

A table goes stale when the simulation changes (its version numbers are part of the
key): chapter 04 then simulates again, correctly and more slowly; rerun this script.

Usage: ``python scripts/ship_profile_references.py [--profile tiny]``
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import gradbrain  # noqa: F401  (torchvision work-around before timm)
from gradbrain import book, divergence
from gradbrain.analysis import simulation
from gradbrain.analysis.chapter import chapter_inputs
from gradbrain.models import load

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    chapter = next(c for c in book.chapters(ROOT) if c.name == "04_hierarchy_tests")
    p = {**book.declared_parameters(chapter),
         **book.parameters_for(chapter, book.load_profile(ROOT, args.profile))}
    if p["dataset"] != "simulated":
        raise SystemExit(f"Profile {args.profile!r} tests real data: nothing to ship.")
    losses = list(p["losses"])
    inputs = chapter_inputs(args.profile, p["dataset"], model=p["model"],
                            weights=p["weights"], losses=losses, pool=p["pool"],
                            device=p["device"], cache=p["cache"])
    study, feats = inputs.study, inputs.features
    design = simulation.simulation_design(
        study, feats, net=load(p["model"], weights=p["weights"]), images=p["sim_images"],
        noise=p["sim_noise"], n_images=p["sim_n_images"], pool=p["pool"],
        device=p["device"], cache=p["cache"])
    if design["sizes"]:
        raise SystemExit(f"Study sizes {design['sizes']} are not the simulator's defaults: a "
                         "shipped table would not be found (its key has no sizes).")
    exclude = [study.truth["seed"]] if study.truth else []
    run = dict(alpha=p["alpha"], min_noise_ceiling=p["min_noise_ceiling"],
               min_score=p["min_score"], n_perm=p["n_perm"], n_boot=p["n_boot"], cv=p["cv"],
               gradient_part=p["gradient_part"])
    name = f"{feats.model.split('.')[0]}-{args.profile}"
    start = time.perf_counter()
    if p["n_sim_seeds"]:
        modalities = dict(simulate_fmri=study.betas is not None,
                          simulate_meg=study.epochs is not None)
        table = simulation.simulate_tests(
            design["features"], noise=design["noise"], n_seeds=p["n_sim_seeds"],
            truths=p["sim_truths"], loss=losses[0], exclude_seeds=exclude, **modalities,
            device=p["device"], **run)
        path = simulation.write_reference(
            table, design["features"], noise=design["noise"], name=name, loss=losses[0],
            **modalities, **run,
            note=f"scripts/ship_profile_references.py --profile {args.profile}")
        print(f"shipped {path} ({table[['truth', 'seed']].drop_duplicates().shape[0]} "
              "studies)")
    if p["n_div_seeds"]:
        family_run = {k: run[k] for k in ("min_noise_ceiling", "min_score", "cv",
                                          "gradient_part")}
        contrasts = p["div_contrasts"]
        table = divergence.simulate_family(
            design["features"], noise=design["noise"], n_seeds=p["n_div_seeds"],
            n_seeds_divergent=p["n_div_seeds_divergent"], loss=losses[0],
            simulate_fmri="spatial" in contrasts and study.betas is not None,
            simulate_meg="temporal" in contrasts and study.epochs is not None,
            exclude_seeds=exclude, device=p["device"], **family_run)
        path = divergence.write_family_reference(
            table, design["features"], name=name, noise=design["noise"], loss=losses[0],
            **family_run, note=f"scripts/ship_profile_references.py --profile {args.profile}")
        print(f"shipped {path} ({len(table)} studies)")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
