from apps.videoflow.commands import COMMANDS, DESCRIPTIONS
from core.cli import main

main("videoflow", COMMANDS, DESCRIPTIONS)
