"""One module per tab of the app: its handlers (plain functions), then `build`: its layout and wiring."""
