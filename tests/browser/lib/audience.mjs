// A live room's audience for the SFU browser tests: many watching sessions in ONE page (one
// renderer process instead of one per viewer), each with its own WebSocket session, `join`,
// `av_join` (watching: recvonly) and one RTCPeerConnection to the server, signalled as the
// contract says (the client offers first; it answers the server's offers; candidates trickle
// as `signal` data). What each viewer decodes is counted per publisher, told apart by the
// stream id (`a=msid`) of each section of the server's description.

/// Opens `tokens.length` viewers of `room` in `page` (any page of the server's origin); returns
/// when every one has sent its first offer. Each viewer's state is on `window.__audience`.
export async function openAudience(page, wsUrl, room, tokens) {
  await page.evaluate(async ([url, roomId, toks]) => {
    function viewer(token, name) {
      const v = { name, pc: null, ws: null, rid: 1, replies: new Map(), chain: Promise.resolve(), errors: [] };
      const send = (m) => v.ws.send(JSON.stringify(m));
      const request = (m) => new Promise((resolve) => {
        const rid = v.rid++;
        v.replies.set(rid, resolve);
        send({ ...m, rid });
      });
      const signal = (data) => send({ type: 'signal', room: roomId, to: 'sfu', data });
      async function onSignal(data) {
        const pc = v.pc;
        if (data.sdp) {
          await pc.setRemoteDescription(data.sdp);
          if (data.sdp.type === 'offer') {
            await pc.setLocalDescription(await pc.createAnswer());
            signal({ sdp: { type: 'answer', sdp: pc.localDescription.sdp } });
          }
        } else if (data.candidate) {
          await pc.addIceCandidate(data.candidate);
        }
      }
      v.start = () => new Promise((resolve, reject) => {
        v.ws = new WebSocket(url, 'studyhall.v1');
        v.ws.onerror = () => reject(new Error(name + ': socket error'));
        v.ws.onopen = () => send({ type: 'hello', token });
        v.ws.onmessage = async (e) => {
          const m = JSON.parse(e.data);
          if (m.type === 'welcome') {
            try {
              const j = await request({ type: 'join', room: roomId });
              if (j.type !== 'ok') throw new Error(name + ' join: ' + JSON.stringify(j));
              const av = await request({ type: 'av_join', room: roomId });
              if (av.type !== 'ok' || av.mode !== 'sfu' || av.publish !== false) throw new Error(name + ' av_join: ' + JSON.stringify(av));
              v.pc = new RTCPeerConnection({ iceServers: av.ice_servers || [] });
              v.pc.onicecandidate = (c) => { if (c.candidate) signal({ candidate: c.candidate.toJSON() }); };
              for (const kind of ['audio', 'video']) v.pc.addTransceiver(kind, { direction: 'recvonly' });
              await v.pc.setLocalDescription(await v.pc.createOffer());
              signal({ sdp: { type: 'offer', sdp: v.pc.localDescription.sdp } });
              resolve();
            } catch (err) {
              reject(err);
            }
            return;
          }
          if (m.rid !== undefined && v.replies.has(m.rid)) {
            v.replies.get(m.rid)(m);
            v.replies.delete(m.rid);
            return;
          }
          if (m.type === 'signal' && m.from && m.from.session === 'sfu') {
            v.chain = v.chain.then(() => onSignal(m.data)).catch((err) => v.errors.push(String(err)));
          }
        };
      });
      /// Frames decoded so far per publisher (the section's stream id).
      v.sample = async () => {
        const byUser = {};
        const desc = v.pc && v.pc.currentRemoteDescription;
        if (!desc) return byUser;
        const userOf = {};
        for (const sec of desc.sdp.split(/\r?\nm=/).slice(1)) {
          const mid = (sec.match(/\na=mid:(\S+)/) || [])[1];
          const msid = (sec.match(/\na=msid:(\S+)/) || [])[1];
          if (mid !== undefined && msid) userOf[mid] = msid;
        }
        (await v.pc.getStats()).forEach((s) => {
          if (s.type === 'inbound-rtp' && s.kind === 'video' && userOf[s.mid]) {
            byUser[userOf[s.mid]] = (byUser[userOf[s.mid]] || 0) + (s.framesDecoded || 0);
          }
        });
        return byUser;
      };
      return v;
    }
    window.__audience = toks.map((t, i) => viewer(t, 'viewer' + i));
    await Promise.all(window.__audience.map((v) => v.start()));
  }, [wsUrl, room, tokens]);
}

/// Every viewer's frames decoded per publisher: [{user: frames}], and any signalling errors.
export function sampleAudience(page) {
  return page.evaluate(async () => ({
    frames: await Promise.all(window.__audience.map((v) => v.sample())),
    errors: window.__audience.flatMap((v) => v.errors.map((e) => v.name + ': ' + e)),
  }));
}
