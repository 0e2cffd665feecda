// Package e2e holds the end-to-end tests: they build the daemon and tcp-info,
// create a server network namespace joined by a veth pair, run real traffic
// through it and check the daemon's files against a reference tcpdump
// capture. They need root and skip without it.
package e2e
