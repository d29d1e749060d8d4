"""DIRECT against random selection on the SN2 candidate pool: feature coverage of N structures.

    python benchmarks/direct_vs_random.py [--config examples/sn2/config.yaml] [--n-select N] [--draws 20]

Uses the seeds and the sampling settings of the config; without the config file it falls back to built-in
rough SN2 geometries and the default settings. Coverage is measured in DIRECT's weighted principal-component
space (see pyacemaker.services.sampler.direct.coverage_score), the same for both selections.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from ase import Atoms

from pyacemaker.config import DirectConfig, PoolConfig, load_config
from pyacemaker.seeds import load_seeds
from pyacemaker.services.sampler.direct import coverage_score, select_direct
from pyacemaker.services.sampler.features import get_featuriser
from pyacemaker.services.sampler.pool import generate_pool

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "sn2" / "config.yaml"


def sn2_inputs(config_path: Path) -> tuple[list[Atoms], PoolConfig, DirectConfig, str]:
    config = load_config(config_path)
    return load_seeds(config), config.sampling.pool, config.sampling.direct, str(config_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config with seeds and settings")
    parser.add_argument("--n-select", type=int, help="structures to select (default: the config's n_select)")
    parser.add_argument("--draws", type=int, default=20, help="random selections to average over")
    args = parser.parse_args(argv)

    seeds, pool_config, direct_config, source = sn2_inputs(args.config)
    n_select = args.n_select or direct_config.n_select
    started = time.perf_counter()
    pool = generate_pool(seeds, pool_config)
    pooled = time.perf_counter()
    featuriser = "distribution" if direct_config.featuriser == "auto" else direct_config.featuriser
    features = get_featuriser(featuriser)(pool.structures)
    featurised = time.perf_counter()
    selection = select_direct(features, n_select, direct_config.k_per_cluster, direct_config.random_seed)
    selected = time.perf_counter()

    bins = direct_config.coverage_bins
    direct = coverage_score(selection.pc_scores, selection.indices, bins)
    rng = np.random.default_rng(direct_config.random_seed)
    random = np.array(
        [
            coverage_score(selection.pc_scores, rng.choice(len(features), n_select, replace=False), bins)
            for _ in range(args.draws)
        ]
    )

    print(f"inputs:    {source}")
    print(f"pool:      {len(pool.structures)} structures from {len(seeds)} seeds ({pool.n_rejected} rejected)")
    print(f"features:  {features.shape[1]} per structure ({featuriser})")
    print(
        f"PCA:       {selection.n_components} components kept (Kaiser), "
        f"{100 * selection.explained_variance_ratio.sum():.1f} % of the variance"
    )
    print(f"selection: N = {n_select}, k = {direct_config.k_per_cluster}, {selection.n_clusters} BIRCH clusters")
    print(
        f"time:      pool {pooled - started:.2f} s, features {featurised - pooled:.2f} s, "
        f"DIRECT {selected - featurised:.2f} s"
    )
    print(f"coverage ({bins} bins per component):")
    print(f"  DIRECT   {direct:.3f}")
    print(f"  random   {random.mean():.3f} ± {random.std(ddof=1):.3f}  (mean ± std over {args.draws} draws)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
