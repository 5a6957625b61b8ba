from apps.graphaf.commands import COMMANDS, DESCRIPTIONS
from core.cli import main

main("graphaf", COMMANDS, DESCRIPTIONS)
