from apps.waveflow.commands import COMMANDS, DESCRIPTIONS
from core.cli import main

main("waveflow", COMMANDS, DESCRIPTIONS)
