from apps.density2d.commands import COMMANDS, DESCRIPTIONS
from core.cli import main

main("density2d", COMMANDS, DESCRIPTIONS)
