"""trpo_ext.presets: every rl-baselines3-zoo TRPO entry translated key by key (the action spaces
are given, so the MuJoCo / Box2D / PyBullet entries need no simulator), -v4 entries for -v5 ids, the
default with its notice, gSDE's presets, and `trpo-ext train ENV --preset zoo`."""
import gymnasium as gym
import pytest

from trpo_ext import TRPO, presets
from trpo_ext.cli import build_parser, main
from trpo_ext.cli_options import UsageError, flags_of, hyperparameter_options
from trpo_ext.presets import ZOO_TRPO, zoo, zoo_key

# The action dimension of each zoo env with Box actions (d, the KL scale); the others are Discrete.
BOX_DIMS = {"Pendulum-v1": 1, "LunarLanderContinuous-v3": 2, "MountainCarContinuous-v0": 1, "Ant-v4": 8,
            "HalfCheetah-v4": 6, "Hopper-v4": 3, "Walker2d-v4": 6, "Humanoid-v4": 17, "Swimmer-v4": 2,
            "BipedalWalker-v3": 4, "BipedalWalkerHardcore-v3": 4, "HalfCheetahBulletEnv-v0": 6,
            "AntBulletEnv-v0": 8, "Walker2DBulletEnv-v0": 6, "HopperBulletEnv-v0": 3, "ReacherBulletEnv-v0": 2,
            "MinitaurBulletEnv-v0": 8, "MinitaurBulletDuckEnv-v0": 8, "HumanoidBulletEnv-v0": 17,
            "InvertedDoublePendulumBulletEnv-v0": 1, "InvertedPendulumSwingupBulletEnv-v0": 1}

# zoo key -> trpo_ext key (target_kl and cg_damping times d); normalize, n_timesteps and policy below.
ZOO_KEYS = dict(n_envs="n_envs", n_steps="n_steps", batch_size="critic_batch_size", gamma="gamma",
                gae_lambda="gae_lambda", learning_rate="critic_lr", n_critic_updates="critic_epochs",
                cg_max_steps="cg_iters", cg_damping="damping", target_kl="max_kl", sub_sampling_factor="fvp_fraction")
SB3_DEFAULTS = dict(n_envs=1, n_steps=2048, batch_size=128, gamma=0.99, gae_lambda=0.95, learning_rate=1e-3,
                    n_critic_updates=10, cg_max_steps=15, cg_damping=0.1, target_kl=0.01, sub_sampling_factor=1)


@pytest.fixture
def spaces(monkeypatch):
    """The zoo envs' action spaces without making the envs."""
    def space(env_id):
        key = zoo_key(env_id)
        return gym.spaces.Box(-1, 1, (BOX_DIMS[key],)) if key in BOX_DIMS else gym.spaces.Discrete(3)
    monkeypatch.setattr(presets, "env_action_space", space)


@pytest.mark.parametrize("key", [k for k in ZOO_TRPO if k != "default"])
def test_every_zoo_entry(key, spaces):
    entry = ZOO_TRPO[key]
    assert set(entry) <= {*ZOO_KEYS, "normalize", "n_timesteps", "policy", "use_sde", "sde_sample_freq",
                          "policy_kwargs"} and entry["policy"] == "MlpPolicy"
    if "policy_kwargs" in entry:  # ReacherBulletEnv-v0: ortho_init=False
        with pytest.raises(ValueError, match=r"policy_kwargs\['ortho_init'\]=False"):
            zoo(key)
        return
    got, d = zoo(key), BOX_DIMS.get(key, 1)
    for theirs, ours in ZOO_KEYS.items():
        value = entry.get(theirs, SB3_DEFAULTS[theirs])
        expected = {"target_kl": value * d, "cg_damping": value * d, "sub_sampling_factor": 1.0}.get(theirs, value)
        assert got[ours] == pytest.approx(expected), theirs
    normalize = entry.get("normalize", False)
    assert (got["normalize_obs"], got["normalize_reward"]) == (normalize, normalize)
    if normalize:
        assert (got["obs_clip"], got["reward_clip"]) == (10.0, 10.0)  # VecNormalize's defaults
    assert "seed" not in got and "device" not in got and got["policy_kwargs"] == {"activation": "tanh"}
    assert (got["use_sde"], got["sde_sample_freq"]) == ((True, 4) if entry.get("use_sde") else (False, -1))
    assert presets.zoo_timesteps(key) == int(entry["n_timesteps"])


def test_v5_uses_the_v4_entry_and_halfcheetahs_kl(spaces):
    assert zoo_key("Hopper-v5") == "Hopper-v4" and zoo_key("LunarLander-v3") == "LunarLander-v3"
    got = zoo("HalfCheetah-v5")
    assert got["max_kl"] == pytest.approx(0.04 * 6) and got["damping"] == pytest.approx(0.1 * 6)
    assert (got["n_envs"], got["n_steps"], got["cg_iters"], got["critic_epochs"]) == (2, 1024, 25, 20)


def test_env_without_entry_gets_the_default_and_a_notice(spaces, capsys):
    assert zoo_key("Acrobot-v0") == "default"
    got = zoo("Acrobot-v0")
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "no entry for Acrobot-v0; using its default" in notice
    assert (got["n_envs"], got["n_steps"], got["max_kl"], got["normalize_obs"]) == (1, 2048, 0.01, False)


def _options(argv):
    parser = build_parser()
    args = parser.parse_args(["train", *argv])
    args.flags = flags_of(parser.commands["train"])
    return hyperparameter_options(args)


def test_cli_preset_under_the_flags():
    options = _options(["CartPole-v1", "--preset", "zoo", "--n-steps", "64", "--set", "cg_iters=5"])
    assert options == {**zoo("CartPole-v1"), "n_steps": 64, "cg_iters": 5}
    assert options["damping"] == 1e-3 and options["n_envs"] == 2
    assert _options(["CartPole-v1"]).get("damping") is None
    with pytest.raises(UsageError, match="--preset with --resume"):
        _options(["CartPole-v1", "--preset", "zoo", "--resume"])


def test_cli_runs_gsde_presets(tmp_path):
    """Pendulum-v1's zoo preset uses gSDE (use_sde, sde_sample_freq=4): the command line trains it."""
    assert _options(["Pendulum-v1", "--preset", "zoo"])["use_sde"] is True
    out = tmp_path / "run"
    assert main(["train", "Pendulum-v1", "--preset", "zoo", "--timesteps", "64", "--n-steps", "32", "--no-progress",
                 "--eval-episodes", "1", "--set", "critic_epochs=1", "--out", str(out)]) == 0
    agent = TRPO.load(next(out.rglob("*.pt")))
    assert agent.config.use_sde and agent.config.sde_sample_freq == 4 and agent.num_timesteps == 64
