from apps.pointflow.commands import COMMANDS, DESCRIPTIONS
from core.cli import main

main("pointflow", COMMANDS, DESCRIPTIONS)
