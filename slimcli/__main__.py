"""``python -m slimcli`` runs the command line."""

from slimcli.cli import main

if __name__ == "__main__":
    main()
