package exporter

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// The server is reachable by whoever can reach its address (the seed's
// default is every interface), so it is bounded like a production server:
// a request's headers must come within HeaderTimeout, its body within
// ReadTimeout, the response be taken within WriteTimeout, and a kept-alive
// connection is closed after IdleTimeout. At most MaxConns connections are
// open at once: one more closes the oldest that has not begun a request
// (a connection that sends nothing, or sits idle between requests), so
// idle connections can neither take the process's descriptors nor keep a
// health probe out (TestIdleConnections, and e2e's TestMetricsPortFlood
// with 2,000 idle connections under a 1,024-descriptor limit).
const (
	HeaderTimeout = 5 * time.Second
	ReadTimeout   = 10 * time.Second
	WriteTimeout  = 30 * time.Second
	IdleTimeout   = 30 * time.Second
	MaxConns      = 64
)

// Options configures Listen.
type Options struct {
	// Extra handlers by path (the health checks).
	Extra map[string]http.Handler
	// Pprof serves /debug/pprof/. It exposes the process's memory, and a
	// trace read slowly grows memory outside the Go heap, where -maxheap
	// cannot see it: callers allow it on a loopback address only.
	Pprof bool
	// MaxConns overrides the package's MaxConns (tests).
	MaxConns int
}

// Server serves /metrics, the extra handlers and, if asked, pprof.
type Server struct {
	srv  *http.Server
	ln   *limitListener
	done chan error
}

// Listen binds addr (":0" picks a free port) and starts serving the
// registry's metrics at /metrics, and o's handlers.
func Listen(addr string, reg *prometheus.Registry, o Options) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listen on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	if o.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{MaxRequestsInFlight: 4, Timeout: WriteTimeout}))
	for path, h := range o.Extra {
		mux.Handle(path, h)
	}
	max := o.MaxConns
	if max <= 0 {
		max = MaxConns
	}
	ll := &limitListener{Listener: ln, max: max, conns: map[net.Conn]*connInfo{}}
	s := &Server{ln: ll, done: make(chan error, 1), srv: &http.Server{Handler: mux,
		ReadHeaderTimeout: HeaderTimeout, ReadTimeout: ReadTimeout, WriteTimeout: WriteTimeout,
		IdleTimeout: IdleTimeout, MaxHeaderBytes: 8 << 10, ConnState: ll.state}}
	go func() { s.done <- s.srv.Serve(ll) }()
	return s, nil
}

// Addr returns the address the server listens on.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Shutdown stops the server, waiting for requests in flight until ctx ends,
// and for the serving goroutine.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if serr := <-s.done; serr != nil && !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	return err
}

// limitListener keeps at most max connections open: accepting one more
// closes the oldest that is not in a request.
type limitListener struct {
	net.Listener
	max   int
	mu    sync.Mutex
	conns map[net.Conn]*connInfo
	seq   uint64
}

type connInfo struct {
	seq    uint64 // acceptance order
	active bool   // in a request
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.admit(c) {
			return c, nil
		}
		c.Close() // every connection held is in a request
	}
}

// admit makes room for c, closing the oldest connection not in a request
// if max are open, and reports whether c is held.
func (l *limitListener) admit(c net.Conn) bool {
	l.mu.Lock()
	var evict net.Conn
	if len(l.conns) >= l.max {
		var oldest uint64
		for oc, ci := range l.conns {
			if !ci.active && (evict == nil || ci.seq < oldest) {
				evict, oldest = oc, ci.seq
			}
		}
		if evict != nil {
			delete(l.conns, evict)
		}
	}
	ok := len(l.conns) < l.max
	if ok {
		l.seq++
		l.conns[c] = &connInfo{seq: l.seq}
	}
	l.mu.Unlock()
	if evict != nil {
		evict.Close()
	}
	return ok
}

// state follows the server's connections (http.Server.ConnState).
func (l *limitListener) state(c net.Conn, s http.ConnState) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ci, ok := l.conns[c]
	switch {
	case !ok:
	case s == http.StateClosed || s == http.StateHijacked:
		delete(l.conns, c)
	default:
		ci.active = s == http.StateActive
	}
}

// open returns the number of connections held.
func (l *limitListener) open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}
