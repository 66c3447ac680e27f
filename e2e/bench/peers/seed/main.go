// Command kpipe-peer-seed is the "seed-style" Go peer of the kpipe side-by-side
// benchmark: a sarama consumer that reads every partition of a topic with one
// ConsumePartition each and hands each record to its own goroutine (or, with
// -pool N, to a fixed pool of N goroutines fed by a channel). Offsets are
// marked per handled record on a sarama offset manager with auto-commit on.
//
// It exits after -records records have been handled and prints one JSON line:
//
//	{"records":N,"bytes":B,"first_to_last_s":F,"wall_s":W}
//
// See ../README.md.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/IBM/sarama"
)

// processStart is taken during package initialisation, i.e. as close to
// process start as Go code can get; it carries a monotonic clock reading.
var processStart = time.Now()

type options struct {
	brokers  []string
	topic    string
	records  int64
	mode     string
	url      string
	pool     int
	offset   int64
	group    string
	timeout  time.Duration
	maxConns int
}

type result struct {
	Records      int64   `json:"records"`
	Bytes        int64   `json:"bytes"`
	FirstToLastS float64 `json:"first_to_last_s"`
	WallS        float64 `json:"wall_s"`
}

// stats counts handled records. A record is "counted" when its claim on the
// records counter is <= target; its bytes are added before it is "finished",
// so when finished reaches target, bytes holds exactly the value bytes of the
// target records that were counted, and the goroutine that finishes last
// takes the end timestamp.
type stats struct {
	target   int64
	claimed  atomic.Int64
	finished atomic.Int64
	bytes    atomic.Int64

	firstOnce sync.Once
	first     time.Time
	end       time.Time // written once before done is closed
	done      chan struct{}
}

func (s *stats) received() {
	s.firstOnce.Do(func() { s.first = time.Now() })
}

func (s *stats) handled(valueLen int) {
	if s.claimed.Add(1) > s.target {
		return
	}
	s.bytes.Add(int64(valueLen))
	if s.finished.Add(1) == s.target {
		s.end = time.Now()
		close(s.done)
	}
}

func main() {
	opts, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kpipe-peer-seed:", err)
		os.Exit(1)
	}
	res, err := run(opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kpipe-peer-seed:", err)
		os.Exit(1)
	}
	line, _ := json.Marshal(res)
	fmt.Println(string(line))
}

func parseFlags() (options, error) {
	var o options
	// Bad flags are errors like any other: exit 1 (flag.ExitOnError would exit 2).
	flag.CommandLine.Init(os.Args[0], flag.ContinueOnError)
	brokers := flag.String("brokers", "localhost:9092", "comma-separated bootstrap brokers")
	flag.StringVar(&o.topic, "topic", "", "topic to consume (all partitions)")
	flag.Int64Var(&o.records, "records", 0, "exit once this many records have been handled")
	flag.StringVar(&o.mode, "mode", "noop", "record handler: noop | http")
	flag.StringVar(&o.url, "url", "", "http mode: POST each record value to this URL")
	flag.IntVar(&o.pool, "pool", 0, "0 = one goroutine per record (seed); >0 = fixed worker pool of this many goroutines")
	offset := flag.String("offset", "oldest", "where each partition starts: oldest | newest")
	flag.StringVar(&o.group, "group", "peers-seed", "group id of the offset manager that marks and auto-commits offsets")
	flag.DurationVar(&o.timeout, "timeout", 300*time.Second, "fail if -records are not handled within this time")
	flag.IntVar(&o.maxConns, "max-conns", 0, "http mode: http.Transport.MaxConnsPerHost (0 = unlimited, the net/http default)")
	if err := flag.CommandLine.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		return o, err
	}

	for _, b := range strings.Split(*brokers, ",") {
		if b = strings.TrimSpace(b); b != "" {
			o.brokers = append(o.brokers, b)
		}
	}
	switch {
	case flag.NArg() > 0:
		return o, fmt.Errorf("unexpected arguments: %q", flag.Args())
	case len(o.brokers) == 0:
		return o, errors.New("-brokers is empty")
	case o.topic == "":
		return o, errors.New("-topic is required")
	case o.records <= 0:
		return o, errors.New("-records must be > 0")
	case o.pool < 0:
		return o, errors.New("-pool must be >= 0")
	case o.group == "":
		return o, errors.New("-group is empty")
	case o.timeout <= 0:
		return o, errors.New("-timeout must be > 0")
	}
	switch o.mode {
	case "noop":
	case "http":
		if o.url == "" {
			return o, errors.New("-mode http needs -url")
		}
	default:
		return o, fmt.Errorf("unknown -mode %q (noop | http)", o.mode)
	}
	switch *offset {
	case "oldest":
		o.offset = sarama.OffsetOldest
	case "newest":
		o.offset = sarama.OffsetNewest
	default:
		return o, fmt.Errorf("unknown -offset %q (oldest | newest)", *offset)
	}
	return o, nil
}

func run(o options) (*result, error) {
	cfg := sarama.NewConfig()
	cfg.ClientID = "kpipe-peer-seed"
	cfg.Consumer.Return.Errors = true
	cfg.Consumer.Offsets.AutoCommit.Enable = true
	cfg.Consumer.Offsets.Initial = o.offset

	client, err := sarama.NewClient(o.brokers, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect %v: %w", o.brokers, err)
	}
	consumer, err := sarama.NewConsumerFromClient(client)
	if err != nil {
		_ = client.Close()
		return nil, fmt.Errorf("consumer: %w", err)
	}
	om, err := sarama.NewOffsetManagerFromClient(o.group, client)
	if err != nil {
		_ = consumer.Close()
		_ = client.Close()
		return nil, fmt.Errorf("offset manager for group %q: %w", o.group, err)
	}
	partitions, err := consumer.Partitions(o.topic)
	if err != nil {
		_ = om.Close()
		_ = consumer.Close()
		_ = client.Close()
		return nil, fmt.Errorf("partitions of %q: %w", o.topic, err)
	}

	st := &stats{target: o.records, done: make(chan struct{})}
	fatal := make(chan error, 1)
	fail := func(err error) {
		select {
		case fatal <- err:
		default:
		}
	}

	handle := newHandler(o, fail)

	var (
		pcs  []sarama.PartitionConsumer
		poms []sarama.PartitionOffsetManager
		// Offset-manager errors seen once the target was reached: the final
		// commit (om.Close) reports its failures only on these channels.
		lateCommitErrs atomic.Int64
		pomDrained     sync.WaitGroup
	)
	cleanup := func() error {
		var errs []error
		for _, pc := range pcs {
			pc.AsyncClose()
		}
		for _, pom := range poms {
			pom.AsyncClose()
		}
		// Closing the offset manager flushes the marked offsets (final commit)
		// and then closes the partition offset managers' error channels.
		if err := om.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close offset manager (final commit): %w", err))
		}
		pomDrained.Wait()
		if n := lateCommitErrs.Load(); n > 0 {
			errs = append(errs, fmt.Errorf("final offset commit for group %q failed (%d errors above)", o.group, n))
		}
		if err := consumer.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close consumer: %w", err))
		}
		if err := client.Close(); err != nil && !errors.Is(err, sarama.ErrClosedClient) {
			errs = append(errs, fmt.Errorf("close client: %w", err))
		}
		return errors.Join(errs...)
	}

	var jobs chan job
	if o.pool > 0 {
		jobs = make(chan job, 256)
		for i := 0; i < o.pool; i++ {
			go func() {
				for j := range jobs {
					process(handle, st, j)
				}
			}()
		}
	}

	for _, p := range partitions {
		pom, err := om.ManagePartition(o.topic, p)
		if err != nil {
			_ = cleanup()
			return nil, fmt.Errorf("manage offsets of %s/%d: %w", o.topic, p, err)
		}
		poms = append(poms, pom)
		pc, err := consumer.ConsumePartition(o.topic, p, o.offset)
		if err != nil {
			_ = cleanup()
			return nil, fmt.Errorf("consume %s/%d: %w", o.topic, p, err)
		}
		pcs = append(pcs, pc)

		go drainErrors(fmt.Sprintf("partition %d", p), pc.Errors())
		pomDrained.Add(1)
		go func(p int32) {
			defer pomDrained.Done()
			for err := range pom.Errors() {
				fmt.Fprintf(os.Stderr, "kpipe-peer-seed: offset commit for partition %d: %v\n", p, err)
				select {
				case <-st.done:
					lateCommitErrs.Add(1)
				default:
				}
			}
		}(p)

		go func(pc sarama.PartitionConsumer, pom sarama.PartitionOffsetManager) {
			for msg := range pc.Messages() {
				st.received()
				j := job{msg: msg, pom: pom}
				if jobs == nil {
					go process(handle, st, j) // the seed: one goroutine per record
					continue
				}
				select {
				case jobs <- j:
				case <-st.done:
					// Stop feeding the pool once the target is reached; the
					// remaining records are neither handled nor marked.
					for range pc.Messages() {
					}
					return
				}
			}
		}(pc, pom)
	}

	timer := time.NewTimer(o.timeout)
	defer timer.Stop()
	select {
	case <-st.done:
	case err := <-fatal:
		_ = closeWithin(cleanup, 10*time.Second)
		return nil, err
	case <-timer.C:
		_ = closeWithin(cleanup, 10*time.Second)
		return nil, fmt.Errorf("timeout: %d of %d records handled after %s", min(st.finished.Load(), o.records), o.records, o.timeout)
	}

	res := &result{
		Records:      st.finished.Load(),
		Bytes:        st.bytes.Load(),
		FirstToLastS: st.end.Sub(st.first).Seconds(),
		WallS:        st.end.Sub(processStart).Seconds(),
	}

	// Stop fetching and flush the marked offsets (final commit), with a bound.
	// The pool channel is never closed (a partition goroutine may be about to
	// send on it); the process exits right after.
	if err := closeWithin(cleanup, 30*time.Second); err != nil {
		return nil, err
	}
	return res, nil
}

func closeWithin(cleanup func() error, limit time.Duration) error {
	closed := make(chan error, 1)
	go func() { closed <- cleanup() }()
	select {
	case err := <-closed:
		return err
	case <-time.After(limit):
		return fmt.Errorf("shutdown (final offset commit) did not finish within %s", limit)
	}
}

type job struct {
	msg *sarama.ConsumerMessage
	pom sarama.PartitionOffsetManager
}

// process runs the handler on one record; on success it marks the record's
// offset (the auto-committer commits marked offsets every second) and counts it.
func process(handle func([]byte) error, st *stats, j job) {
	if err := handle(j.msg.Value); err != nil {
		return // handler reported the failure
	}
	j.pom.MarkOffset(j.msg.Offset+1, "")
	st.handled(len(j.msg.Value))
}

// newHandler returns the per-record work. http mode POSTs the value with one
// shared client; any non-2xx answer or transport error is fatal.
func newHandler(o options, fail func(error)) func([]byte) error {
	if o.mode == "noop" {
		return func([]byte) error { return nil }
	}
	idle := o.pool
	if idle == 0 {
		idle = 256
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConns = idle
	transport.MaxIdleConnsPerHost = idle
	transport.MaxConnsPerHost = o.maxConns
	hc := &http.Client{Transport: transport, Timeout: 30 * time.Second}
	return func(value []byte) error {
		req, err := http.NewRequestWithContext(context.Background(), http.MethodPost, o.url, bytes.NewReader(value))
		if err != nil {
			fail(fmt.Errorf("http request: %w", err))
			return err
		}
		req.Header.Set("Content-Type", "application/octet-stream")
		resp, err := hc.Do(req)
		if err != nil {
			fail(fmt.Errorf("POST %s: %w", o.url, err))
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode > 299 {
			err := fmt.Errorf("POST %s: status %s", o.url, resp.Status)
			fail(err)
			return err
		}
		return nil
	}
}

func drainErrors(what string, errs <-chan *sarama.ConsumerError) {
	for err := range errs {
		fmt.Fprintf(os.Stderr, "kpipe-peer-seed: %s: %v\n", what, err)
	}
}
