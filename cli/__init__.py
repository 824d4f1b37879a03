"""bitquant's command layer (installed as ``bitquant.cli``): click commands and rich rendering only."""
