package health

import (
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

func TestTransitions(t *testing.T) {
	var capture, events atomic.Bool
	capture.Store(true)
	events.Store(true)
	c := New(time.Minute)
	c.Add("capture eth0", capture.Load)
	c.Add("eventsocket", events.Load)
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	check := func(at time.Duration, wantReady, wantLive bool) {
		t.Helper()
		now := t0.Add(at)
		c.Sample(now)
		down, dead := c.Status(now)
		if (len(down) == 0) != wantReady || (len(dead) == 0) != wantLive {
			t.Errorf("at %v: down %v dead %v; want ready %v live %v", at, down, dead, wantReady, wantLive)
		}
	}
	check(0, true, true)
	events.Store(false) // tcp-info restarts
	check(time.Second, false, true)
	check(50*time.Second, false, true)
	events.Store(true) // and comes back within the grace period
	check(55*time.Second, true, true)
	capture.Store(false) // the interface goes away for good
	check(60*time.Second, false, true)
	check(121*time.Second, false, false)
	capture.Store(true)
	check(122*time.Second, true, true)
}

func TestHandlers(t *testing.T) {
	var up atomic.Bool
	c := New(0)
	c.Add("capture eth0", up.Load)
	c.Serving()
	c.Sample(time.Now().Add(-time.Second))
	for _, tt := range []struct {
		h    http.HandlerFunc
		want int
	}{{c.Ready, http.StatusServiceUnavailable}, {c.Live, http.StatusServiceUnavailable}} {
		rec := httptest.NewRecorder()
		tt.h(rec, httptest.NewRequest("GET", "/", nil))
		if rec.Code != tt.want {
			t.Errorf("status %d, want %d: %s", rec.Code, tt.want, rec.Body)
		}
	}
	up.Store(true)
	c.Sample(time.Now())
	rec := httptest.NewRecorder()
	c.Live(rec, httptest.NewRequest("GET", "/", nil))
	if rec.Code != http.StatusOK || rec.Body.String() != "ok\n" {
		t.Errorf("healthy: %d %q", rec.Code, rec.Body)
	}
}

// TestReadyOnlyWhenServing: /readyz fails until every part is registered
// (a daemon whose captures are still opening is not capturing yet), while
// /healthz does not.
func TestReadyOnlyWhenServing(t *testing.T) {
	c := New(time.Minute)
	get := func(h http.HandlerFunc) int {
		rec := httptest.NewRecorder()
		h(rec, httptest.NewRequest("GET", "/", nil))
		return rec.Code
	}
	if got := get(c.Ready); got != http.StatusServiceUnavailable {
		t.Errorf("ready before Serving: %d", got)
	}
	if got := get(c.Live); got != http.StatusOK {
		t.Errorf("live before Serving: %d", got)
	}
	c.Add("capture eth0", func() bool { return true })
	c.Serving()
	if got := get(c.Ready); got != http.StatusOK {
		t.Errorf("ready after Serving: %d", got)
	}
}
