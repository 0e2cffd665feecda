package offline

import (
	"bufio"
	"container/heap"
	"errors"
	"fmt"
	"io"
	"math"
	"net/netip"

	"github.com/m-lab/packet-headers/tcpeventsocket"
)

// ReorderWindow is how many events an events file is read ahead of the
// packets, to put them in timestamp order: tcp-info writes them in order,
// and a recording that interleaves lines a little is put right within the
// window. The events are read as the packets' clock reaches them, so a
// file of millions costs this many in memory, not millions
// (TestEventsStreamed). Standard input, which cannot be read twice (once
// for the server's addresses, once for the events), is read whole.
const ReorderWindow = 1 << 12

// eventStream reads the events of a file in timestamp order.
type eventStream struct {
	br      *bufio.Reader
	closeFn func()
	window  int
	h       eventHeap
	seq     uint64
	eof     bool
	events  int // events read
	bad     int // lines that were not events
	err     error
}

// openEvents opens an events file (gzip allowed; "-" for stdin) and reads
// its first events.
func openEvents(path string, stdin io.Reader) (*eventStream, error) {
	r, closeFn, err := open(path, stdin)
	if err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	s := &eventStream{br: bufio.NewReaderSize(r, tcpeventsocket.MaxLineBytes), closeFn: closeFn, window: ReorderWindow}
	if path == "-" {
		s.window = math.MaxInt
	}
	s.fill()
	return s, s.err
}

// fill reads events until the window is full or the file ends.
func (s *eventStream) fill() {
	for !s.eof && len(s.h) < s.window {
		line, err := s.br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) { // a line too long: skipped
			s.bad++
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = s.br.ReadSlice('\n')
			}
			line = nil
		}
		if err != nil {
			s.eof = true
			if !errors.Is(err, io.EOF) {
				s.err = fmt.Errorf("events: %w", err)
			}
		}
		for len(line) > 0 && (line[len(line)-1] == '\n' || line[len(line)-1] == '\r' || line[len(line)-1] == ' ') {
			line = line[:len(line)-1]
		}
		if len(line) == 0 {
			continue
		}
		e, perr := tcpeventsocket.ParseLine(line)
		if perr != nil {
			s.bad++
			continue
		}
		s.events++
		s.seq++
		heap.Push(&s.h, seqEvent{e, s.seq})
	}
}

// next returns the next event if its time is at or before until (any, with
// all), reading on.
func (s *eventStream) next(until int64, all bool) (tcpeventsocket.Parsed, bool) {
	if len(s.h) == 0 || !all && s.h[0].Timestamp.UnixNano() > until {
		return tcpeventsocket.Parsed{}, false
	}
	e := heap.Pop(&s.h).(seqEvent)
	s.fill()
	return e.Parsed, true
}

func (s *eventStream) close() { s.closeFn() }

// eventLocals returns the local ends of the Open events of an events file,
// each address once, reading it through without keeping its events.
func eventLocals(path string, stdin io.Reader) ([]netip.Addr, error) {
	s, err := openEvents(path, stdin)
	if err != nil {
		return nil, err
	}
	defer s.close()
	seen := map[netip.Addr]bool{}
	var out []netip.Addr
	for e, ok := s.next(0, true); ok; e, ok = s.next(0, true) {
		if a := e.Local.Addr(); e.Open && !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	return out, s.err
}

// seqEvent is an event and its place in the file, which orders events of
// the same time as the file does.
type seqEvent struct {
	tcpeventsocket.Parsed
	seq uint64
}

type eventHeap []seqEvent

func (h eventHeap) Len() int { return len(h) }
func (h eventHeap) Less(i, j int) bool {
	if !h[i].Timestamp.Equal(h[j].Timestamp) {
		return h[i].Timestamp.Before(h[j].Timestamp)
	}
	return h[i].seq < h[j].seq
}
func (h eventHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *eventHeap) Push(x any)   { *h = append(*h, x.(seqEvent)) }
func (h *eventHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}
