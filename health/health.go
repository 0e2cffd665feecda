// Package health turns the state of the daemon's parts into the answers of
// two HTTP probes:
//
//   - /readyz is 200 while every part is up: every capture running, the
//     eventsocket connected (when one is configured). A part that is down
//     makes it 503 at once, and so does a daemon still starting (its parts
//     are not all registered until Serving is called).
//   - /healthz (liveness) is 200 unless a part has been down for longer
//     than the grace period: then the daemon is not doing its job and a
//     restart may help (the interface never came back, tcp-info's socket is
//     gone).
//
// Parts are sampled by Sample (the daemon calls it every second, which
// dates a part's going down) and by every probe, which answers from the
// parts' state at that moment. A Checker is safe for concurrent use.
package health

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"
)

// Checker tracks parts by name.
type Checker struct {
	grace   time.Duration
	mu      sync.Mutex
	parts   map[string]*part
	serving bool
}

type part struct {
	up        func() bool
	isUp      bool
	downSince time.Time
}

// New returns a checker whose liveness fails after a part is down for grace.
func New(grace time.Duration) *Checker {
	return &Checker{grace: grace, parts: map[string]*part{}}
}

// Add registers a part; up reports whether it works. It counts as up until
// the first Sample.
func (c *Checker) Add(name string, up func() bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.parts[name] = &part{up: up, isUp: true}
}

// Remove forgets a part (a capture of an interface that is gone for good).
func (c *Checker) Remove(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.parts, name)
}

// Serving says that every part is registered: /readyz answers 503
// ("starting") until then.
func (c *Checker) Serving() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.serving = true
}

// Sample reads every part's state at time now.
func (c *Checker) Sample(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sample(now)
}

func (c *Checker) sample(now time.Time) {
	for _, p := range c.parts {
		up := p.up()
		if !up && p.isUp {
			p.downSince = now
		}
		p.isUp = up
	}
}

// Status samples the parts and returns the ones that are down and the
// ones down longer than the grace period at time now, sorted.
func (c *Checker) Status(now time.Time) (down, dead []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sample(now)
	for name, p := range c.parts {
		if !p.isUp {
			d := now.Sub(p.downSince).Round(time.Second)
			down = append(down, fmt.Sprintf("%s (down %v)", name, d))
			if now.Sub(p.downSince) > c.grace {
				dead = append(dead, name)
			}
		}
	}
	sort.Strings(down)
	sort.Strings(dead)
	return down, dead
}

// Ready serves /readyz.
func (c *Checker) Ready(w http.ResponseWriter, r *http.Request) {
	down, _ := c.Status(time.Now())
	c.mu.Lock()
	if !c.serving {
		down = append([]string{"starting"}, down...)
	}
	c.mu.Unlock()
	reply(w, len(down) == 0, down)
}

// Live serves /healthz.
func (c *Checker) Live(w http.ResponseWriter, r *http.Request) {
	down, dead := c.Status(time.Now())
	reply(w, len(dead) == 0, down)
}

func reply(w http.ResponseWriter, ok bool, down []string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	if len(down) == 0 {
		fmt.Fprintln(w, "ok")
		return
	}
	fmt.Fprintf(w, "down: %s\n", strings.Join(down, ", "))
}
