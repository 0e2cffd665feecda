package saver

import (
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/m-lab/packet-headers/index"
	"github.com/m-lab/packet-headers/packet"
	"github.com/m-lab/packet-headers/record"
)

// Flow writes one flow's file. Its methods may be called from any one
// goroutine while the flow's writer runs in its own.
type Flow struct {
	s        *Saver
	uuid     string
	linkType packet.LinkType
	first    time.Time

	mu      sync.Mutex
	queue   []*record.Chunk
	final   bool
	rename  string // the name the flow takes instead of uuid, if not ""
	wake    chan struct{}
	running bool          // the writer's goroutine was started
	rec     *index.Record // given by End
	settled bool          // the writer is done; res is its file if res.ok
	res     fileResult
}

// fileResult is what a flow's writer published.
type fileResult struct {
	ok                      bool
	uuid, path              string // path relative to the data directory
	packets, bytes, written int
}

// Start starts the writer of the flow named uuid, captured on a link of type
// lt, whose first packet was at first. It returns at once. No goroutine is
// made until the first Push that hands the flow something to write: one
// pushed whole at once (buffer mode: most flows) is written by one of a
// few goroutines that write such flows one after another; one pushed in
// parts (a long flow's batches, -stream) gets a goroutine of its own. So a
// million flows held at once, or ended at once (the end of an offline
// capture of a SYN scan), cost no goroutine each (TestManyFlowsEndAtOnce).
func (s *Saver) Start(uuid string, lt packet.LinkType, first time.Time) *Flow {
	f := &Flow{s: s, uuid: uuid, linkType: lt, first: first, wake: make(chan struct{}, 1)}
	s.wg.Add(1)
	s.active.Add(1)
	s.mu.Lock()
	s.writing[f] = struct{}{}
	s.mu.Unlock()
	return f
}

// write is the flow's writer goroutine, started by Push.
func (f *Flow) write() {
	s := f.s
	defer s.wg.Done()
	defer s.active.Add(-1)
	f.run()
	s.mu.Lock()
	delete(s.writing, f)
	s.mu.Unlock()
	f.mu.Lock()
	if f.final {
		s.draining.Add(-1)
	}
	f.mu.Unlock()
}

// enqueue hands a flow pushed whole to the goroutines that write such
// flows, making one if fewer than twice the saver's I/O slots run.
func (s *Saver) enqueue(f *Flow) {
	s.mu.Lock()
	s.pending = append(s.pending, f)
	spawn := s.writers < 2*cap(s.io)
	if spawn {
		s.writers++
	}
	s.mu.Unlock()
	if spawn {
		go s.writePending()
	}
}

// writePending writes the flows pushed whole, until none waits.
func (s *Saver) writePending() {
	for {
		s.mu.Lock()
		if len(s.pending) == 0 {
			s.writers--
			s.mu.Unlock()
			return
		}
		f := s.pending[0]
		s.pending[0], s.pending = nil, s.pending[1:]
		s.mu.Unlock()
		f.write()
	}
}

// Writing returns the UUIDs of the flows started and not finished yet,
// sorted: what a shutdown cut short did not write.
func (s *Saver) Writing() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.writing))
	for f := range s.writing {
		out = append(out, f.name())
	}
	sort.Strings(out)
	return out
}

// Push hands the writer buf's full chunks, or, when final is set, all of
// them and the end of the flow. It never blocks on I/O. After a final Push
// the Flow must not be used again.
func (f *Flow) Push(buf *record.Buffer, final bool) {
	cs, _ := buf.Take(final)
	if len(cs) == 0 && !final {
		return
	}
	f.mu.Lock()
	f.queue = append(f.queue, cs...)
	if final && !f.final {
		f.final = true
		f.s.draining.Add(1)
	}
	start := !f.running
	f.running = true
	f.mu.Unlock()
	switch {
	case start && final:
		f.s.enqueue(f)
	case start:
		go f.write()
	}
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// Rename gives the flow another UUID, as long as its last chunks have not
// been pushed: the file is published under the last name given. It never
// blocks on I/O.
func (f *Flow) Rename(uuid string) {
	f.mu.Lock()
	f.rename = uuid
	f.mu.Unlock()
}

func (f *Flow) next() (cs []*record.Chunk, final bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cs, f.queue = f.queue, nil
	return cs, f.final
}

// name returns the flow's UUID as it is now.
func (f *Flow) name() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.rename != "" {
		return f.rename
	}
	return f.uuid
}

// run is the writer goroutine. Its state lives in a flowFile on the heap,
// and its steps are methods with small frames: the goroutine then opens its
// file within the 2 KiB stack it starts with, with no stack growth per flow
// (the lab's offline row, BenchmarkLab, measures the per-flow cost).
func (f *Flow) run() {
	// The name is checked before anything is created (and again when it
	// is published): never a path out of the data directory, and no path
	// cleaning needed. The partial file's name is the flow's own: two flows
	// named alike never share one (TestNoCrossWiring).
	w := &flowFile{f: f, file: -1}
	if err := CheckUUID(f.uuid); err != nil {
		w.op, w.err = "name", err
	} else {
		// Numbered, not named after the UUID, which may take all of a
		// file name's 255 bytes (TestLongestUUID).
		w.tmp = strconv.FormatUint(f.s.seq.Add(1), 10) + ".pcap"
	}
	for {
		<-f.wake
		cs, final := f.next()
		f.s.io <- struct{}{}
		w.write(cs)
		if final {
			break
		}
		<-f.s.io
	}
	w.finish()
	<-f.s.io
	w.account()
	f.settle(w)
}

// settle records the writer's outcome, and writes the flow's index record
// if End gave it already.
func (f *Flow) settle(w *flowFile) {
	res := fileResult{ok: w.err == nil, uuid: w.published, path: w.final, packets: w.packets, bytes: w.raw, written: w.written}
	f.mu.Lock()
	f.settled, f.res = true, res
	rec := f.rec
	f.mu.Unlock()
	if rec != nil && res.ok {
		f.s.record(rec, &res, f.first)
	}
}

// End gives the flow's index record, once its file was pushed whole and the
// flow is over (the demuxer knows its last counts then); the Flow keeps r,
// which the caller must not change. The record is written once the file is
// published, never for a file that was not (TestIndexRecords). It never
// blocks on I/O.
func (f *Flow) End(r *index.Record) {
	f.mu.Lock()
	f.rec = r
	settled, res := f.settled, f.res
	f.mu.Unlock()
	if settled && res.ok {
		// The writer is gone (the file was finished at -captureduration,
		// and the flow went on): the record is written on a goroutine of
		// its own, as the writer would have.
		f.s.wg.Add(1)
		go func() {
			defer f.s.wg.Done()
			f.s.record(r, &res, f.first)
		}()
	}
}

// record completes a flow's index record with what its writer published,
// and writes it.
func (s *Saver) record(r *index.Record, res *fileResult, first time.Time) {
	r.UUID, r.File = res.uuid, res.path
	r.Packets, r.Bytes, r.FileBytes = uint64(res.packets), uint64(res.bytes), uint64(res.written)
	s.index.add(r, first)
}
