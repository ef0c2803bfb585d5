// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "../utils/Test.sol";
import {Slashing} from "../../src/Slashing.sol";
import {SlashingHandler} from "./SlashingHandler.sol";

/// @notice Spot-check cases stay bounded under random commits, attestations (by two verifiers, one of them switched
///         on and off), dismissals, finalizations and time: at most one open or slashed case per node and epoch, at
///         most the cap per epoch, and the registry's freeze matches the open cases (issue 20).
contract SlashingInvariantTest is Test {
    SlashingHandler internal handler;
    Slashing internal slashing;

    function setUp() public {
        handler = new SlashingHandler();
        slashing = handler.slashingContract();
        targetContract(address(handler));
        bytes4[] memory selectors = new bytes4[](6);
        selectors[0] = SlashingHandler.commit.selector;
        selectors[1] = SlashingHandler.warp.selector;
        selectors[2] = SlashingHandler.setVerifier.selector;
        selectors[3] = SlashingHandler.attest.selector;
        selectors[4] = SlashingHandler.dismiss.selector;
        selectors[5] = SlashingHandler.finalize.selector;
        targetSelector(FuzzSelector({addr: address(handler), selectors: selectors}));
    }

    /// @dev Each epoch holds at most `maxCasesPerEpoch` open or slashed cases, as the model counts them.
    function invariant_CasesPerEpochCapped() public view {
        for (uint256 i; i < handler.epochCount(); ++i) {
            uint64 epoch = handler.epochs(i);
            uint256 count = slashing.casesInEpoch(epoch);
            assertLe(count, slashing.maxCasesPerEpoch(), "cap");
            assertEq(count, handler.ghostInEpoch(epoch), "cases in epoch");
        }
    }

    /// @dev A node has one case place per epoch and is slashed at most once per epoch.
    function invariant_OneCasePerNodeAndEpoch() public view {
        for (uint256 n; n < handler.NODES(); ++n) {
            address node = handler.nodeAddress(n);
            for (uint256 i; i < handler.epochCount(); ++i) {
                uint64 epoch = handler.epochs(i);
                assertEq(slashing.caseOf(node, epoch), handler.ghostCaseOf(n, epoch), "case of node and epoch");
                assertLe(handler.slashesIn(n, epoch), 1, "slashed twice in one epoch");
            }
        }
    }

    /// @dev The registry's unbond freeze is exactly "has an open case".
    function invariant_FreezeMatchesOpenCases() public view {
        for (uint256 n; n < handler.NODES(); ++n) {
            address node = handler.nodeAddress(n);
            assertEq(slashing.openCases(node), handler.ghostOpen(n), "open cases");
            assertEq(slashing.hasOpenCase(node), handler.ghostOpen(n) != 0, "freeze");
        }
    }
}
