from lowbit.cli.main import run_cli

if __name__ == "__main__":  # guard: spawned worker processes re-import the main module
    run_cli()
