"""fleetctl: run the whole stack on one machine and query the fleet."""
