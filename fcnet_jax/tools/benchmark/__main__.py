"""`python -m fcnet_jax.tools.benchmark`: the benchmark's command line."""

from fcnet_jax.tools.benchmark import cli

if __name__ == "__main__":
  cli.run()
