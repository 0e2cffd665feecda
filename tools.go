//go:build tools

// This file pins the tcp-info module, whose binary the end-to-end tests build
// and run beside the daemon (go build github.com/m-lab/tcp-info).
package main

import _ "github.com/m-lab/tcp-info"
