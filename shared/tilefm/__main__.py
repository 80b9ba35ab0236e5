from tilefm.cli import app

app(prog_name="tilefm")
