// The browser side of the browser tests: a minimal studyhall client (WebSocket, `hello`,
// requests matched by `rid`, an event log the tests can wait on) and the WebRTC peer logic
// (RTCPeerConnection per call or per A/V peer, trickle ICE through `signal`, remote
// candidates held until the remote description is set, stats summaries for assertions).
// Everything the tests call is on `window.sh` and returns plain JSON-able values.
'use strict';

(() => {
  const log = [];
  function note(...args) {
    const line = args.map((a) => (typeof a === 'string' ? a : JSON.stringify(a))).join(' ');
    log.push(line);
    console.log('[sh] ' + line);
  }

  function setStatus(text) {
    document.getElementById('status').textContent = text;
  }

  function timeout(ms, what) {
    return new Promise((_, reject) => setTimeout(() => reject(new Error('timed out: ' + what)), ms));
  }

  // -- the studyhall connection --------------------------------------------------------------

  let ws = null;
  let me = null; // welcome
  let nextRid = 1;
  const pendingReplies = new Map(); // rid -> resolve
  const events = []; // every frame without a rid, in order
  let waiters = []; // {pred, resolve}

  function onFrame(msg) {
    if (msg.rid !== undefined && pendingReplies.has(msg.rid)) {
      const resolve = pendingReplies.get(msg.rid);
      pendingReplies.delete(msg.rid);
      resolve(msg);
      return;
    }
    events.push(msg);
    if (msg.type === 'signal') onSignal(msg);
    if (msg.type === 'av_peer' && !msg.joined) closePeer(msg.room + '/' + msg.session);
    waiters = waiters.filter((w) => {
      if (w.pred(msg)) {
        w.resolve(msg);
        return false;
      }
      return true;
    });
  }

  function connect(url, token) {
    return new Promise((resolve, reject) => {
      ws = new WebSocket(url, 'studyhall.v1');
      let welcomed = false;
      ws.onopen = () => ws.send(JSON.stringify({ type: 'hello', token }));
      ws.onmessage = (e) => {
        const msg = JSON.parse(e.data);
        if (!welcomed) {
          welcomed = true;
          if (msg.type === 'welcome') {
            me = msg;
            setStatus('signed in as ' + msg.user.id + ' (' + msg.session + ')');
            resolve(msg);
          } else {
            reject(new Error('no welcome: ' + e.data));
          }
          return;
        }
        onFrame(msg);
      };
      ws.onclose = (e) => {
        note('websocket closed', e.code, e.reason);
        if (!welcomed) reject(new Error('closed before welcome: ' + e.code));
      };
    });
  }

  /// Sends a command with a fresh rid; resolves with the reply frame (ok or error).
  function request(cmd, ms = 10000) {
    const rid = nextRid++;
    const reply = new Promise((resolve) => pendingReplies.set(rid, resolve));
    ws.send(JSON.stringify({ ...cmd, rid }));
    return Promise.race([reply, timeout(ms, 'reply to ' + cmd.type)]);
  }

  /// The first event (already received or still to come) matching `match`: an object whose
  /// fields must all be equal in the event.
  function waitEvent(match, ms = 10000) {
    const pred = (m) => Object.entries(match).every(([k, v]) => m[k] === v);
    const seen = events.find(pred);
    if (seen) return Promise.resolve(seen);
    const got = new Promise((resolve) => waiters.push({ pred, resolve }));
    return Promise.race([got, timeout(ms, 'event ' + JSON.stringify(match))]);
  }

  // -- media ---------------------------------------------------------------------------------

  let localStream = null;

  async function media(constraints) {
    localStream = await navigator.mediaDevices.getUserMedia(constraints);
    document.getElementById('local').srcObject = localStream;
    return localStream.getTracks().map((t) => t.kind);
  }

  // -- peers ---------------------------------------------------------------------------------

  const peers = new Map(); // key -> Peer
  const early = new Map(); // key -> [data] signals that arrived before their peer existed
  const autoAnswer = new Map(); // room -> peer options for offers from new A/V peers

  class Peer {
    constructor(key, opts, send) {
      this.key = key;
      this.send = send;
      this.opts = opts;
      this.pc = new RTCPeerConnection({
        iceServers: opts.iceServers || [],
        iceTransportPolicy: opts.iceTransportPolicy || 'all',
      });
      this.held = []; // remote candidates waiting for the remote description
      this.chain = Promise.resolve(); // remote signals are applied one at a time, in order
      this.localCandidates = [];
      this.candidateErrors = [];
      this.states = [];
      this.tracksAdded = false;
      this.signalErrors = [];
      const pc = this.pc;
      pc.onicecandidate = (e) => {
        if (e.candidate) this.localCandidates.push(e.candidate.type || '?');
        this.send({ candidate: e.candidate ? e.candidate.toJSON() : null });
      };
      pc.onicecandidateerror = (e) => {
        this.candidateErrors.push({ url: e.url, errorCode: e.errorCode, errorText: e.errorText });
        note(key, 'icecandidateerror', e.url, e.errorCode, e.errorText);
      };
      pc.onconnectionstatechange = () => {
        this.states.push(pc.connectionState);
        note(key, 'connectionState', pc.connectionState);
        renderStatus();
      };
      pc.ontrack = (e) => this.showRemote(e.streams[0] || new MediaStream([e.track]));
      if (!opts.recvOnly && localStream && opts.offerer) this.addTracks();
      for (const data of early.get(key) || []) this.handle(data);
      early.delete(key);
    }

    addTracks() {
      if (this.tracksAdded || !localStream) return;
      this.tracksAdded = true;
      for (const t of localStream.getTracks()) this.pc.addTrack(t, localStream);
    }

    showRemote(stream) {
      const id = 'remote-' + this.key.replace(/[^A-Za-z0-9_-]/g, '_');
      let video = document.getElementById(id);
      if (!video) {
        const fig = document.createElement('figure');
        video = document.createElement('video');
        video.id = id;
        video.autoplay = true;
        video.muted = true; // autoplay policy; audio is still received and decoded
        video.playsInline = true;
        const cap = document.createElement('figcaption');
        cap.textContent = 'remote ' + this.key;
        fig.append(video, cap);
        document.getElementById('videos').append(fig);
      }
      video.srcObject = stream;
    }

    async offer() {
      const o = await this.pc.createOffer();
      await this.pc.setLocalDescription(o);
      this.send({ sdp: { type: o.type, sdp: o.sdp } });
    }

    handle(data) {
      this.chain = this.chain.then(() => this.apply(data)).catch((e) => {
        this.signalErrors.push(String(e));
        note(this.key, 'signal error', String(e));
      });
    }

    async apply(data) {
      const pc = this.pc;
      if (data.sdp) {
        await pc.setRemoteDescription(data.sdp);
        for (const c of this.held.splice(0)) await this.addCandidate(c);
        if (data.sdp.type === 'offer') {
          if (!this.opts.recvOnly) this.addTracks();
          const a = await pc.createAnswer();
          await pc.setLocalDescription(a);
          this.send({ sdp: { type: a.type, sdp: a.sdp } });
        }
      } else if ('candidate' in data) {
        if (!pc.remoteDescription) this.held.push(data.candidate);
        else await this.addCandidate(data.candidate);
      }
    }

    async addCandidate(c) {
      // null is end-of-candidates.
      if (c) await this.pc.addIceCandidate(c);
      else await this.pc.addIceCandidate();
    }

    close() {
      this.pc.close();
    }
  }

  function renderStatus() {
    const lines = [me ? 'signed in as ' + me.user.id + ' (' + me.session + ')' : 'not connected'];
    for (const [k, p] of peers) lines.push(k + ': ' + p.pc.connectionState);
    setStatus(lines.join('\n'));
  }

  function addPeer(key, opts, send) {
    const p = new Peer(key, opts, send);
    peers.set(key, p);
    renderStatus();
    return p;
  }

  function closePeer(key) {
    const p = peers.get(key);
    if (p) {
      p.close();
      peers.delete(key);
    }
  }

  function onSignal(msg) {
    const key = msg.call_id ? msg.call_id : msg.room + '/' + msg.from.session;
    let p = peers.get(key);
    if (!p && msg.room && autoAnswer.has(msg.room) && msg.data.sdp && msg.data.sdp.type === 'offer') {
      p = addPeer(key, autoAnswer.get(msg.room), avSender(msg.room, msg.from.session));
    }
    if (p) p.handle(msg.data);
    else {
      if (!early.has(key)) early.set(key, []);
      early.get(key).push(msg.data);
    }
  }

  // Relays go through `signal`; a refused relay is recorded on the peer and logged.
  function sender(key, cmd) {
    return (data) => {
      request({ ...cmd, data }).then((r) => {
        if (r.type !== 'ok') {
          note(key, 'signal refused', r.code, r.message);
          const p = peers.get(key);
          if (p) p.signalErrors.push(r.code);
        }
      });
    };
  }

  function avSender(room, session) {
    return sender(room + '/' + session, { type: 'signal', room, to: session });
  }

  function iceOpts(reply, opts) {
    return {
      iceServers: opts.iceServers || reply.ice_servers || [],
      iceTransportPolicy: opts.iceTransportPolicy,
      recvOnly: !!opts.recvOnly,
    };
  }

  /// Caller: `call`, wait until accepted, then offer. Resolves with the call's ok reply (or
  /// the error reply).
  async function call(to, mediaKinds, opts = {}) {
    const reply = await request({ type: 'call', to, media: mediaKinds });
    if (reply.type !== 'ok') return reply;
    const id = reply.call_id;
    const state = await waitEvent({ type: 'call_state', call_id: id, state: 'accepted' }, opts.ringMs || 15000);
    note('call', id, state.state);
    const p = addPeer(id, { ...iceOpts(reply, opts), offerer: true }, sender(id, { type: 'signal', call_id: id }));
    await p.offer();
    return reply;
  }

  /// Callee: wait for `call_incoming`, accept, and answer the offer when it comes.
  async function acceptCall(opts = {}) {
    const inc = await waitEvent({ type: 'call_incoming' }, opts.ringMs || 15000);
    const reply = await request({ type: 'call_accept', call_id: inc.call_id });
    if (reply.type !== 'ok') return reply;
    addPeer(inc.call_id, iceOpts(reply, opts), sender(inc.call_id, { type: 'signal', call_id: inc.call_id }));
    return { ...reply, incoming: inc };
  }

  /// A/V room: `av_join`, offer to every peer already there, answer every newcomer's offer.
  async function avJoin(room, opts = {}) {
    const reply = await request({ type: 'av_join', room });
    if (reply.type !== 'ok') return reply;
    const o = iceOpts(reply, opts);
    autoAnswer.set(room, o);
    if (!opts.noOffers) {
      for (const peer of reply.peers) {
        const key = room + '/' + peer.session;
        const p = addPeer(key, { ...o, offerer: true }, avSender(room, peer.session));
        await p.offer();
      }
    }
    return reply;
  }

  /// Offers to one A/V peer (for a peer that joined after us and did not offer itself).
  async function avOffer(room, session, opts = {}) {
    const key = room + '/' + session;
    const p = addPeer(key, { ...(autoAnswer.get(room) || {}), ...opts, offerer: true }, avSender(room, session));
    await p.offer();
    return key;
  }

  /// An SDP offer made by a throw-away connection (sending the local tracks unless
  /// `recvOnly`), for the tests that check what the server refuses to relay.
  async function makeOffer(recvOnly = false) {
    const pc = new RTCPeerConnection({ iceServers: [] });
    if (recvOnly) {
      pc.addTransceiver('audio', { direction: 'recvonly' });
      pc.addTransceiver('video', { direction: 'recvonly' });
    } else {
      for (const t of localStream.getTracks()) pc.addTrack(t, localStream);
    }
    const o = await pc.createOffer();
    pc.close();
    return { type: o.type, sdp: o.sdp };
  }

  function waitConnected(key, ms = 20000) {
    return new Promise((resolve, reject) => {
      const start = Date.now();
      const check = () => {
        const p = peers.get(key);
        const s = p ? p.pc.connectionState : 'absent';
        if (s === 'connected') return resolve(Date.now() - start);
        if (s === 'failed') return reject(new Error(key + ' failed: ' + JSON.stringify(peerInfo(key))));
        if (Date.now() - start > ms) {
          return reject(new Error(key + ' not connected after ' + ms + ' ms: ' + JSON.stringify(peerInfo(key))));
        }
        setTimeout(check, 50);
      };
      check();
    });
  }

  function peerInfo(key) {
    const p = peers.get(key);
    if (!p) return null;
    return {
      connectionState: p.pc.connectionState,
      iceConnectionState: p.pc.iceConnectionState,
      iceGatheringState: p.pc.iceGatheringState,
      states: p.states,
      localCandidates: p.localCandidates,
      candidateErrors: p.candidateErrors,
      signalErrors: p.signalErrors,
      held: p.held.length,
      remoteDescription: p.pc.remoteDescription && p.pc.remoteDescription.type,
      localDescription: p.pc.localDescription && p.pc.localDescription.type,
    };
  }

  /// Inbound RTP counters and the selected candidate pair of one peer connection.
  async function stats(key) {
    const p = peers.get(key);
    const report = await p.pc.getStats();
    const inbound = [];
    let pairId = null;
    report.forEach((s) => {
      if (s.type === 'inbound-rtp') {
        inbound.push({ kind: s.kind, framesDecoded: s.framesDecoded || 0, bytesReceived: s.bytesReceived || 0 });
      }
      if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
    });
    let pair = null;
    const sel = pairId && report.get(pairId);
    if (sel) {
      const l = report.get(sel.localCandidateId);
      const r = report.get(sel.remoteCandidateId);
      pair = { state: sel.state, local: l && l.candidateType, remote: r && r.candidateType };
    }
    return { inbound, pair };
  }

  window.sh = {
    connect, request, waitEvent, media, call, acceptCall, avJoin, avOffer, makeOffer, waitConnected,
    peerInfo, stats,
    peerKeys: () => [...peers.keys()],
    me: () => me,
    events: () => events,
    log: () => log,
  };
})();
